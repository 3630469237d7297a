/* CRC-32 as zlib, gzip and PNG compute it (reflected polynomial 0xEDB88320, initial value and final
 * XOR 0xFFFFFFFF): crc32_update(0, "123456789", 9) == 0xCBF43926, and the same value as Python's
 * zlib.crc32, so tools/hf_export.py checks a checkpoint's tensors with the standard library alone.
 * Checkpoints store one per tensor (train/checkpoint.h). */
#ifndef MSA_CRC32_H
#define MSA_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* The CRC of the bytes before data (0 for none) extended by data[0..n): streaming, so that
 * crc32_update(crc32_update(0, a, na), b, nb) is the CRC of a followed by b. */
uint32_t crc32_update(uint32_t crc, const void *data, size_t n);

#endif
