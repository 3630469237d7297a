/* Block-granular sliding-window attention (model.attention = "window", layers/window.c). */
#ifndef MSA_LAYER_WINDOW_H
#define MSA_LAYER_WINDOW_H

#include "attention.h"

/* q [N, Hq, D], k, v [N, Hkv, D] -> [N, Hq, D]: each query's softmax attention over its window of p's
 * local_blocks blocks (its own and those before it) and the init_blocks sink blocks of its document
 * (p->topk_blocks = init_blocks + local_blocks). */
Tensor *window_attend(Engine *e, const MsaParams *p, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens);

#endif
