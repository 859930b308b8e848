/* charlstm's native step kernel: one time step of a stack of LSTM layers plus the output
 * head, for B independent streams, in one call.
 *
 * charlstm.native compiles this file on first use (cc -O3 -march=native), caches the
 * library and calls it through ctypes. It exists because for one stream the work per
 * character is two small matrix-vector products, and the BLAS gemv behind PyTorch and
 * NumPy reaches only about a third of this machine's cache bandwidth on them.
 *
 * Layout (prepared by native.py):
 *  - every matrix is packed in panels of CHUNK consecutive outputs: panel p is a contiguous
 *    block of K rows, row k holding the weights from input k to outputs p*CHUNK.. p*CHUNK+63,
 *    so one panel streams through the cache once per step whatever the batch size;
 *  - gate order is PyTorch's (i, f, g, o); output widths are zero-padded to a CHUNK multiple;
 *  - layer 0 reads its input part from `table` (input projection plus both biases, one
 *    padded row per character); layer l > 0 has K = 2H rows: H from the layer below, then H
 *    from its own previous output;
 *  - h and c are (L, state_rows, H), of which this call updates its first B rows (a shard of
 *    the batch when several threads share one); gates is (B, Np) scratch; logits is (B, Vp).
 * Each accumulator sums over k in the same order whatever the batch size, so a stream's
 * numbers do not depend on which other streams share its batch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define VECS 4
#define CHUNK (LANES * VECS)
#define ROWS 4

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef float uvec __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

typedef struct {
    int32_t batch, layers, units, gates_padded, vocab_padded, hard_sigmoid;
    int32_t state_rows; /* rows per layer in h and c: the whole batch when this is a shard of it */
    const int32_t *ids;
    const float *table;
    const float *const *weights;
    const float *const *biases;
    const float *head_weight;
    const float *head_bias;
    float *h, *c, *gates, *logits;
} Net;

static inline vec load(const float *p) { return *(const uvec *)p; }
static inline void store(float *p, vec v) { *(uvec *)p = v; }

/* out[r] = init[r] + x0[r] . panel[:K0] + x1[r] . panel[K0:], for R <= ROWS rows. */
static inline __attribute__((always_inline)) void panel_rows(
    const int R, int K0, const float *x0, int K1, const float *x1, long x_stride,
    const float *panel, const float *const init[ROWS], float *out, long out_stride)
{
    vec acc[ROWS][VECS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < VECS; j++)
            acc[r][j] = load(init[r] + j * LANES);
    const float *w = panel;
    for (int k = 0; k < K0; k++, w += CHUNK) {
        vec w0 = load(w), w1 = load(w + LANES), w2 = load(w + 2 * LANES), w3 = load(w + 3 * LANES);
        for (int r = 0; r < R; r++) {
            vec x = (vec){0} + x0[r * x_stride + k];
            acc[r][0] += x * w0; acc[r][1] += x * w1; acc[r][2] += x * w2; acc[r][3] += x * w3;
        }
    }
    for (int k = 0; k < K1; k++, w += CHUNK) {
        vec w0 = load(w), w1 = load(w + LANES), w2 = load(w + 2 * LANES), w3 = load(w + 3 * LANES);
        for (int r = 0; r < R; r++) {
            vec x = (vec){0} + x1[r * x_stride + k];
            acc[r][0] += x * w0; acc[r][1] += x * w1; acc[r][2] += x * w2; acc[r][3] += x * w3;
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < VECS; j++)
            store(out + r * out_stride + j * LANES, acc[r][j]);
}

/* out (B, n_out) = init + [x0 | x1] @ W; init row b is init_base + ids[b] * n_out (ids NULL:
 * the same row for all). x0, x1 are (B, K0) and (B, K1) with row stride x_stride. */
static void packed_matmul(int B, int n_out, int K0, const float *x0, int K1, const float *x1,
                          long x_stride, const float *W, const float *init_base,
                          const int32_t *ids, float *out)
{
    const long panel_size = (long)(K0 + K1) * CHUNK;
    for (int p = 0; p < n_out / CHUNK; p++) {
        const float *panel = W + p * panel_size;
        for (int r0 = 0; r0 < B; r0 += ROWS) {
            const int R = B - r0 < ROWS ? B - r0 : ROWS;
            const float *init[ROWS];
            for (int r = 0; r < R; r++)
                init[r] = init_base + (ids ? (long)ids[r0 + r] * n_out : 0) + p * CHUNK;
            const float *a = x0 + r0 * x_stride, *b = x1 ? x1 + r0 * x_stride : 0;
            float *o = out + (long)r0 * n_out + p * CHUNK;
            switch (R) {
            case 4: panel_rows(4, K0, a, K1, b, x_stride, panel, init, o, n_out); break;
            case 3: panel_rows(3, K0, a, K1, b, x_stride, panel, init, o, n_out); break;
            case 2: panel_rows(2, K0, a, K1, b, x_stride, panel, init, o, n_out); break;
            default: panel_rows(1, K0, a, K1, b, x_stride, panel, init, o, n_out); break;
            }
        }
    }
}

/* exp(x) for x clamped to [-87, 88]: Cody-Waite reduction to |r| <= ln2/2, degree-7 Taylor
 * polynomial (relative error below 1e-7), 2^n from the exponent bits. Branch-free so that
 * the compiler vectorises the loops that call it. */
static inline float exp_clamped(float x)
{
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + round_magic) - round_magic;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }
static inline float tanh_(float x) { return 2.0f / (1.0f + exp_clamped(-2.0f * x)) - 1.0f; }

static inline float hard_sigmoid(float x)
{
    float y = 0.2f * x + 0.5f; /* Keras 2's definition */
    y = y < 0.0f ? 0.0f : y;
    return y > 1.0f ? 1.0f : y;
}

/* c = f * c + i * g; h = o * tanh(c), for every stream, from the (B, Np) gate sums. */
static void lstm_cell(int B, int H, int Np, int hard, const float *gates, float *h, float *c)
{
    for (int b = 0; b < B; b++) {
        const float *gi = gates + (long)b * Np, *gf = gi + H, *gg = gi + 2 * H, *go = gi + 3 * H;
        float *hb = h + (long)b * H, *cb = c + (long)b * H;
        if (hard) {
            for (int j = 0; j < H; j++) {
                float cj = hard_sigmoid(gf[j]) * cb[j] + hard_sigmoid(gi[j]) * tanh_(gg[j]);
                cb[j] = cj;
                hb[j] = hard_sigmoid(go[j]) * tanh_(cj);
            }
        } else {
            for (int j = 0; j < H; j++) {
                float cj = sigmoid(gf[j]) * cb[j] + sigmoid(gi[j]) * tanh_(gg[j]);
                cb[j] = cj;
                hb[j] = sigmoid(go[j]) * tanh_(cj);
            }
        }
    }
}

/* One step: reads net->ids (B), updates net->h and net->c, writes net->logits. */
int charlstm_step(const Net *net)
{
    const int B = net->batch, H = net->units, Np = net->gates_padded;
    const long layer_size = (long)net->state_rows * H;
    if (Np % CHUNK || net->vocab_padded % CHUNK)
        return 1;
    for (int l = 0; l < net->layers; l++) {
        float *h = net->h + l * layer_size, *c = net->c + l * layer_size;
        if (l == 0)
            packed_matmul(B, Np, H, h, 0, 0, H, net->weights[0], net->table, net->ids, net->gates);
        else
            packed_matmul(B, Np, H, h - layer_size, H, h, H, net->weights[l], net->biases[l], 0,
                          net->gates);
        lstm_cell(B, H, Np, net->hard_sigmoid, net->gates, h, c);
    }
    const float *top = net->h + (net->layers - 1) * layer_size;
    packed_matmul(B, net->vocab_padded, H, top, 0, 0, H, net->head_weight, net->head_bias, 0, net->logits);
    return 0;
}

/* Temperature sampling by inverse CDF, the rule of charlstm.generate's NumPy path: weights
 * exp((logit - max logit) / temperature) in double (the max first, so that a tiny
 * temperature gives 0 and -inf, never inf - inf); row r takes the first id whose running
 * weight exceeds u[r] * total (u < 1 - 2^-52, so a zero weight is never taken). */
void charlstm_sample(int32_t rows, int32_t vocab, int64_t stride, const float *logits,
                     const double *inv_temperature, const double *u, int64_t *out)
{
    for (int r = 0; r < rows; r++) {
        const float *l = logits + r * stride;
        const double scale = inv_temperature[r];
        float top = l[0];
        for (int j = 1; j < vocab; j++)
            top = l[j] > top ? l[j] : top;
        double total = 0.0;
        for (int j = 0; j < vocab; j++)
            total += exp(((double)l[j] - top) * scale);
        const double target = u[r] * total;
        double running = 0.0;
        int j = 0;
        for (; j < vocab - 1; j++) {
            running += exp(((double)l[j] - top) * scale);
            if (running > target)
                break;
        }
        out[r] = j;
    }
}

/* Lets the loader check that it talks to the file it compiled. */
int charlstm_abi_version(void) { return 3; }
