/* Ranks agree or stop. Every rank parses its own command line and config file and opens its own data
 * files, so nothing but this check makes them the same: a rank with another optim.lr, seed, batch or
 * sequence length would train silently on another recipe, and one with another model shape would die in
 * a collective of the wrong size with an MPI error that names nothing. After parsing (and after the
 * data files' headers have filled the effective config), rank 0 broadcasts the canonical JSON of its
 * effective config and of each data file's header (vocab_size, tokenizer, tokens, documents); a rank
 * whose own differs stops the job with a message that names the first key that differs and both values.
 *
 * The ranks first meet in a barrier under dist.timeout: a rank that is still opening a file (a FIFO, a
 * stuck network file system) makes the others stop with a message within the timeout rather than wait
 * forever. */
#ifndef MSA_RANKS_AGREE_H
#define MSA_RANKS_AGREE_H

#include "../data/dataset.h"
#include "../dist/dist.h"
#include "config.h"

/* One data file of the run, and the config key that names it ("data.val_path", "data.train_mix[1]"). */
typedef struct AgreedFile {
    const char *key;
    const TokenDataset *ds;
} AgreedFile;

/* Collective over the world (nothing with one rank); `where` prefixes the message (the config file).
 * d's timeout must be set (dist_set_timeout). */
void ranks_agree(const Dist *d, const RunConfig *c, const AgreedFile *files, int n_files, const char *where);

#endif
