/* Typed bodies of the embedding lookup (instantiated by embedding.c). */
static void S(embedding_fwd)(T *out, const T *wte, const int32_t *tokens, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > 65536)
    for (int64_t n = 0; n < N; n++) memcpy(out + n * C, wte + (int64_t)tokens[n] * C, (size_t)C * sizeof(T));
}

/* Scatter-add: parallel over channels so that two tokens with the same id never race, and every
 * row is summed in token order (deterministic). */
static void S(embedding_bwd)(T *dwte, const T *dout, const int32_t *tokens, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > 65536)
    for (int64_t c = 0; c < C; c++)
        for (int64_t n = 0; n < N; n++) dwte[(int64_t)tokens[n] * C + c] += dout[n * C + c];
}
