/* charlstm's native step kernel: one time step of a stack of LSTM layers plus the output
 * head, for B independent streams, in one call.
 *
 * charlstm.native compiles this file on first use (cc -O3 -march=native -pthread), caches
 * the library and calls it through ctypes. It exists because for one stream the work per
 * character is two small matrix-vector products, and the BLAS gemv behind PyTorch and
 * NumPy reaches only about a third of the cache bandwidth on them.
 *
 * Layout (prepared by native.py):
 *  - every matrix is packed in panels of CHUNK consecutive outputs: panel p is a contiguous
 *    block of K rows, row k holding the weights from input k to outputs p*CHUNK.. p*CHUNK+63,
 *    so one panel streams through the cache once per step whatever the batch size;
 *  - bf16 weights (net->bf16) pair rows k and k+1: row pair q holds CHUNK 32-bit words,
 *    word j = bf16 weight (2q, j) in its low half and (2q+1, j) in its high half, the layout
 *    of AVX-512-BF16's dot product; the layer inputs are rounded to bf16 too and every sum
 *    is kept in fp32 (the semantics of AMX and oneDNN's bf16 products);
 *  - gate outputs come in `parts` groups: group s holds (i, f, g, o) for units
 *    s*H/parts.. (s+1)*H/parts, so that a thread owning group s computes its gates and then
 *    its units' cell update with no other thread's results (parts = 1: PyTorch's order);
 *    output widths are zero-padded to a CHUNK multiple;
 *  - layer 0 reads its input part from `table` (input projection plus both biases, one
 *    padded row per character); layer l > 0 has K = 2H rows: H from the layer below, then H
 *    from its own previous output;
 *  - h and c are (L, state_rows, H), of which this call updates its first B rows (a shard of
 *    the batch when several threads share one); gates is (B, Np) scratch; logits is (B, Vp).
 * Each accumulator sums over k in the same order whatever the batch size and however the
 * work is split, so a stream's numbers do not depend on which other streams share its batch
 * nor on the number of threads.
 *
 * Splitting one step across threads, two ways, with one thread team:
 *  - by panels (charlstm_step, net->team): thread t computes panel range t of every layer
 *    and of the head for all rows, then its units' cell update, and meets the others at a
 *    spin barrier once per layer; each thread then reads only its share of the weights,
 *    which stays in its own core's cache;
 *  - by rows (charlstm_step_rows): thread t steps its own shard of the batch, a Net of its
 *    own, alone, and all meet at one barrier at the end.
 * Between steps the helper threads spin a while, then sleep.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LANES 16
#define VECS 4
#define CHUNK (LANES * VECS)
#define ROWS 4
#define MAX_THREADS 64

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef float uvec __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef uint32_t wvec __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint32_t uwvec __attribute__((vector_size(LANES * sizeof(uint32_t)), aligned(4)));

struct Team;

typedef struct {
    int32_t batch, layers, units, gates_padded, vocab_padded, hard_sigmoid;
    int32_t state_rows; /* rows per layer in h and c: the whole batch when this is a shard of it */
    int32_t parts;      /* gate groups in the layout (see above); a team has this many threads */
    int32_t bf16;       /* weights and head are bf16 row pairs */
    int32_t kernel;     /* bf16 products: 0 portable C, 1 AVX-512-BF16 instructions */
    const int32_t *ids;
    const float *table;
    const void *const *weights;
    const float *const *biases;
    const void *head_weight;
    const float *head_bias;
    float *h, *c, *gates, *logits;
    uint16_t *inputs_bf16; /* bf16 only: (threads, B, 2H) scratch, the rounded layer inputs */
    float *h_next;         /* team only: (L, B, H) scratch, new h before it replaces the old */
    struct Team *team;     /* NULL: this thread does the whole step */
} Net;

static inline vec load(const float *p) { return *(const uvec *)p; }
static inline void store(float *p, vec v) { *(uvec *)p = v; }
static inline wvec loadw(const uint32_t *p) { return *(const uwvec *)p; }

/* ------------------------------------------------------------------ fp32 products */

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

/* ------------------------------------------------------------------ bf16 products */

/* Round to the nearest bf16, ties to even (inputs are finite). */
static inline uint16_t to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Portable bf16 pair products: word (lo, hi) -> two floats by a shift and a mask; the high
 * product is added first, as AVX-512-BF16's dot product does. x rows hold K/2 pair words. */
static inline __attribute__((always_inline)) void panel_rows_bf16(
    const int R, int pairs, const uint32_t *x, long x_stride, const uint32_t *panel,
    const float *const init[ROWS], float *out, long out_stride)
{
    vec acc[ROWS][VECS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < VECS; j++)
            acc[r][j] = load(init[r] + j * LANES);
    const uint32_t *w = panel;
    const wvec high_mask = (wvec){0} + 0xffff0000u;
    for (int q = 0; q < pairs; q++, w += CHUNK) {
        vec lo[VECS], hi[VECS];
        for (int j = 0; j < VECS; j++) {
            wvec words = loadw(w + j * LANES);
            lo[j] = (vec)(words << 16);
            hi[j] = (vec)(words & high_mask);
        }
        for (int r = 0; r < R; r++) {
            uint32_t pair = x[r * x_stride + q];
            uint32_t lo_bits = pair << 16, hi_bits = pair & 0xffff0000u;
            float xl, xh;
            memcpy(&xl, &lo_bits, 4);
            memcpy(&xh, &hi_bits, 4);
            vec vl = (vec){0} + xl, vh = (vec){0} + xh;
            for (int j = 0; j < VECS; j++) {
                acc[r][j] += vh * hi[j];
                acc[r][j] += vl * lo[j];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < VECS; j++)
            store(out + r * out_stride + j * LANES, acc[r][j]);
}

#if (defined(__x86_64__) || defined(__i386__)) && \
    ((defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 10))
#define HAVE_BF16_INTRINSICS 1
#include <cpuid.h>
#include <immintrin.h>

__attribute__((target("avx512f,avx512bf16"), always_inline)) static inline void panel_rows_dpbf16(
    const int R, int pairs, const uint32_t *x, long x_stride, const uint32_t *panel,
    const float *const init[ROWS], float *out, long out_stride)
{
    __m512 acc[ROWS][VECS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < VECS; j++)
            acc[r][j] = _mm512_loadu_ps(init[r] + j * LANES);
    const uint32_t *w = panel;
    for (int q = 0; q < pairs; q++, w += CHUNK) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + LANES);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 2 * LANES);
        __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 3 * LANES);
        for (int r = 0; r < R; r++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[r * x_stride + q]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xv);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xv);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xv);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < VECS; j++)
            _mm512_storeu_ps(out + r * out_stride + j * LANES, acc[r][j]);
}

/* A separate function: code for these instructions cannot be inlined into a caller compiled
 * for a CPU without them. */
__attribute__((target("avx512f,avx512bf16"), noinline)) static void panel_dpbf16(
    int R, int pairs, const uint32_t *x, long x_stride, const uint32_t *panel,
    const float *const init[ROWS], float *out, long out_stride)
{
    switch (R) {
    case 4: panel_rows_dpbf16(4, pairs, x, x_stride, panel, init, out, out_stride); break;
    case 3: panel_rows_dpbf16(3, pairs, x, x_stride, panel, init, out, out_stride); break;
    case 2: panel_rows_dpbf16(2, pairs, x, x_stride, panel, init, out, out_stride); break;
    default: panel_rows_dpbf16(1, pairs, x, x_stride, panel, init, out, out_stride); break;
    }
}

/* CPUID leaf 7: AVX-512F (sub-leaf 0, EBX bit 16) and AVX-512-BF16 (sub-leaf 1, EAX bit 5),
 * with the OS saving the zmm registers (XCR0 bits 5-7 and 1-2). */
static int cpu_has_avx512_bf16(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) /* OSXSAVE */
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xe6) != 0xe6)
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16)))
        return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d))
        return 0;
    return (a >> 5) & 1;
}
#else
static int cpu_has_avx512_bf16(void) { return 0; }
#endif

/* Which bf16 kernels this CPU runs: bit 0 portable, bit 1 AVX-512-BF16. */
int charlstm_bf16_kernels(void) { return 1 | (cpu_has_avx512_bf16() << 1); }

/* ------------------------------------------------------------------ panel loops */

typedef struct {
    int B, n_out, K0, K1;
    const float *x0, *x1; /* fp32 inputs (B, K0) and (B, K1), row stride x_stride */
    long x_stride;
    const uint32_t *xb;  /* bf16 inputs as pair words (B, (K0+K1)/2), or NULL for fp32 */
    const void *W;
    const float *init_base;
    const int32_t *ids;   /* init row b is init_base + ids[b] * n_out; NULL: the same row for all */
    float *out;
    int kernel;
} Product;

/* Panels p0..p1 of out (B, n_out) = init + [x0 | x1] @ W. */
static void packed_matmul(const Product *m, int p0, int p1)
{
    const int K = m->K0 + m->K1, B = m->B;
    for (int p = p0; p < p1; p++) {
        for (int r0 = 0; r0 < B; r0 += ROWS) {
            const int R = B - r0 < ROWS ? B - r0 : ROWS;
            const float *init[ROWS];
            for (int r = 0; r < R; r++)
                init[r] = m->init_base + (m->ids ? (long)m->ids[r0 + r] * m->n_out : 0) + p * CHUNK;
            float *o = m->out + (long)r0 * m->n_out + p * CHUNK;
            if (m->xb) {
                const uint32_t *panel = (const uint32_t *)m->W + (long)p * (K / 2) * CHUNK;
                const uint32_t *x = m->xb + (long)r0 * (K / 2);
#ifdef HAVE_BF16_INTRINSICS
                if (m->kernel == 1) {
                    panel_dpbf16(R, K / 2, x, K / 2, panel, init, o, m->n_out);
                    continue;
                }
#endif
                switch (R) {
                case 4: panel_rows_bf16(4, K / 2, x, K / 2, panel, init, o, m->n_out); break;
                case 3: panel_rows_bf16(3, K / 2, x, K / 2, panel, init, o, m->n_out); break;
                case 2: panel_rows_bf16(2, K / 2, x, K / 2, panel, init, o, m->n_out); break;
                default: panel_rows_bf16(1, K / 2, x, K / 2, panel, init, o, m->n_out); break;
                }
            } else {
                const float *panel = (const float *)m->W + (long)p * K * CHUNK;
                const float *a = m->x0 + r0 * m->x_stride, *b = m->x1 ? m->x1 + r0 * m->x_stride : 0;
                switch (R) {
                case 4: panel_rows(4, m->K0, a, m->K1, b, m->x_stride, panel, init, o, m->n_out); break;
                case 3: panel_rows(3, m->K0, a, m->K1, b, m->x_stride, panel, init, o, m->n_out); break;
                case 2: panel_rows(2, m->K0, a, m->K1, b, m->x_stride, panel, init, o, m->n_out); break;
                default: panel_rows(1, m->K0, a, m->K1, b, m->x_stride, panel, init, o, m->n_out); break;
                }
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

/* c = f * c + i * g; h = o * tanh(c), for units u0.. u0+n of every stream, from the gate
 * group at column g0 of the (B, Np) gate sums: i, f, g, o each n wide. h_out rows are H wide. */
static void lstm_cell(int B, int H, int Np, int hard, int g0, int u0, int n, const float *gates,
                      float *h_out, float *c)
{
    for (int b = 0; b < B; b++) {
        const float *gi = gates + (long)b * Np + g0, *gf = gi + n, *gg = gi + 2 * n, *go = gi + 3 * n;
        float *hb = h_out + (long)b * H + u0, *cb = c + (long)b * H + u0;
        if (hard) {
            for (int j = 0; j < n; j++) {
                float cj = hard_sigmoid(gf[j]) * cb[j] + hard_sigmoid(gi[j]) * tanh_(gg[j]);
                cb[j] = cj;
                hb[j] = hard_sigmoid(go[j]) * tanh_(cj);
            }
        } else {
            for (int j = 0; j < n; j++) {
                float cj = sigmoid(gf[j]) * cb[j] + sigmoid(gi[j]) * tanh_(gg[j]);
                cb[j] = cj;
                hb[j] = sigmoid(go[j]) * tanh_(cj);
            }
        }
    }
}

/* ------------------------------------------------------------------ thread team */

typedef struct Team {
    int threads;
    _Atomic unsigned go;         /* step number asked for */
    _Atomic int arrived;         /* barrier: threads arrived in this round */
    _Atomic unsigned round;      /* barrier: rounds completed */
    _Atomic int sleepers, quit;
    const Net *_Atomic net;      /* the step asked for: one Net (panels) or one per thread (rows) */
    _Atomic int rows;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t workers[MAX_THREADS];
    int started;
} Team;

#define SPIN_BEFORE_SLEEP_NS 300000L /* helpers sleep after 0.3 ms without a step */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Every thread of the team waits here until all have arrived. Spins, and yields the core
 * now and then, in case another program holds the core a waited-for thread needs. */
static void barrier(Team *team)
{
    const unsigned round = atomic_load(&team->round);
    if (atomic_fetch_add(&team->arrived, 1) == team->threads - 1) {
        atomic_store(&team->arrived, 0);
        atomic_store(&team->round, round + 1);
        return;
    }
    for (unsigned spins = 1; atomic_load(&team->round) == round; spins++) {
        cpu_relax();
        if (spins % 1024 == 0)
            sched_yield();
    }
}

/* Thread t's share of one step. */
static void step_part(const Net *net, int t, int T)
{
    const int B = net->batch, H = net->units, Np = net->gates_padded, Vp = net->vocab_padded;
    const long layer_size = (long)net->state_rows * H;
    const int P = net->parts, n = H / P; /* gate groups in the layout, units per group */
    const int gate_panels = Np / CHUNK, head_panels = Vp / CHUNK;
    uint16_t *xb = net->bf16 ? net->inputs_bf16 + (long)t * B * 2 * H : 0;
    const float *below = 0;
    for (int l = 0; l < net->layers; l++) {
        float *h = net->h + l * layer_size, *c = net->c + l * layer_size;
        float *h_out = T > 1 ? net->h_next + (long)l * B * H : h;
        Product m = {B, Np, l ? H : 0, H, below, h, H, 0, net->weights[l],
                     l ? net->biases[l] : net->table, l ? 0 : net->ids, net->gates, net->kernel};
        if (l == 0) { m.x0 = h; m.x1 = 0; m.K0 = H; m.K1 = 0; }
        if (xb) {
            const int K = m.K0 + m.K1;
            for (int b = 0; b < B; b++) {
                for (int k = 0; k < m.K0; k++)
                    xb[(long)b * K + k] = to_bf16(m.x0[(long)b * m.x_stride + k]);
                for (int k = 0; k < m.K1; k++)
                    xb[(long)b * K + m.K0 + k] = to_bf16(m.x1[(long)b * m.x_stride + k]);
            }
            m.xb = (const uint32_t *)xb;
        }
        packed_matmul(&m, gate_panels * t / T, gate_panels * (t + 1) / T);
        const int s0 = P * t / T, s1 = P * (t + 1) / T; /* my gate groups */
        for (int s = s0; s < s1; s++)
            lstm_cell(B, H, Np, net->hard_sigmoid, 4 * n * s, n * s, n, net->gates, h_out, c);
        if (T > 1) {
            barrier(net->team);
            /* everyone has read the old h of this layer: replace my units of it */
            for (int b = 0; b < B; b++)
                memcpy(h + (long)b * H + n * s0, h_out + (long)b * H + n * s0, (long)n * (s1 - s0) * sizeof(float));
        }
        below = h_out;
    }
    /* the head reads the top layer's new h (h_next in a team: copies may be under way) */
    Product head = {B, Vp, H, 0, below, 0, H, 0, net->head_weight, net->head_bias, 0, net->logits,
                    net->kernel};
    if (xb) {
        for (int b = 0; b < B; b++)
            for (int k = 0; k < H; k++)
                xb[(long)b * H + k] = to_bf16(below[(long)b * H + k]);
        head.xb = (const uint32_t *)xb;
    }
    packed_matmul(&head, head_panels * t / T, head_panels * (t + 1) / T);
    if (T > 1)
        barrier(net->team);
}

typedef struct {
    Team *team;
    int index;
} WorkerArg;

static void *worker(void *arg)
{
    Team *team = ((WorkerArg *)arg)->team;
    const int index = ((WorkerArg *)arg)->index;
    free(arg);
    unsigned seen = 0;
    for (;;) {
        long idle_since = now_ns();
        for (unsigned spins = 1; atomic_load(&team->go) == seen && !atomic_load(&team->quit); spins++) {
            cpu_relax();
            if (spins % 1024 == 0 && now_ns() - idle_since > SPIN_BEFORE_SLEEP_NS) {
                pthread_mutex_lock(&team->lock);
                atomic_fetch_add(&team->sleepers, 1);
                while (atomic_load(&team->go) == seen && !atomic_load(&team->quit))
                    pthread_cond_wait(&team->wake, &team->lock);
                atomic_fetch_sub(&team->sleepers, 1);
                pthread_mutex_unlock(&team->lock);
            }
        }
        if (atomic_load(&team->quit))
            return 0;
        seen = atomic_load(&team->go);
        const Net *net = atomic_load(&team->net);
        if (atomic_load(&team->rows)) {
            step_part(net + index, 0, 1);
            barrier(team);
        } else {
            step_part(net, index, team->threads);
        }
    }
}

void charlstm_team_free(Team *team)
{
    if (!team)
        return;
    pthread_mutex_lock(&team->lock);
    atomic_store(&team->quit, 1);
    pthread_cond_broadcast(&team->wake);
    pthread_mutex_unlock(&team->lock);
    for (int i = 0; i < team->started; i++)
        pthread_join(team->workers[i], 0);
    pthread_cond_destroy(&team->wake);
    pthread_mutex_destroy(&team->lock);
    free(team);
}

/* A team of `threads` threads for split steps: the caller plus threads - 1 helpers. */
Team *charlstm_team_new(int32_t threads)
{
    if (threads < 2 || threads > MAX_THREADS)
        return 0;
    Team *team = calloc(1, sizeof *team);
    if (!team)
        return 0;
    team->threads = threads;
    pthread_mutex_init(&team->lock, 0);
    pthread_cond_init(&team->wake, 0);
    for (int i = 1; i < threads; i++) {
        WorkerArg *arg = malloc(sizeof *arg);
        if (arg) {
            arg->team = team;
            arg->index = i;
        }
        if (!arg || pthread_create(&team->workers[team->started], 0, worker, arg) != 0) {
            free(arg);
            charlstm_team_free(team);
            return 0;
        }
        team->started++;
    }
    return team;
}

/* Whether net's layout is one this code steps with T threads sharing its panels. */
static int valid(const Net *net, int T)
{
    const int H = net->units;
    if (net->gates_padded % CHUNK || net->vocab_padded % CHUNK || (T > 1 && T != net->parts))
        return 0;
    if (net->parts > 1 && (H % (16 * net->parts) || net->gates_padded != 4 * H))
        return 0;
    if (net->bf16 && (H % 2 || !net->inputs_bf16))
        return 0;
    return T == 1 || net->h_next;
}

/* Hands the team's helpers a step: net (panels) or nets[1..] (rows). */
static void start_helpers(Team *team, const Net *net, int rows)
{
    atomic_store(&team->net, net);
    atomic_store(&team->rows, rows);
    atomic_fetch_add(&team->go, 1);
    if (atomic_load(&team->sleepers) > 0) {
        pthread_mutex_lock(&team->lock);
        pthread_cond_broadcast(&team->wake);
        pthread_mutex_unlock(&team->lock);
    }
}

/* One step: reads net->ids (B), updates net->h and net->c, writes net->logits. */
int charlstm_step(const Net *net)
{
    const int T = net->team ? net->team->threads : 1;
    if (!valid(net, T))
        return 1;
    if (T > 1)
        start_helpers(net->team, net, 0);
    step_part(net, 0, T);
    return 0;
}

/* One step of a batch cut into `count` shards, nets[i] (each with no team of its own) for
 * the rows of shard i: the caller steps shard 0, helper i of `team` (count threads) shard i. */
int charlstm_step_rows(const Net *nets, int32_t count, Team *team)
{
    if (count < 1 || (count > 1 && (!team || team->threads != count)))
        return 1;
    for (int i = 0; i < count; i++)
        if (nets[i].team || !valid(&nets[i], 1))
            return 1;
    if (count == 1) {
        step_part(nets, 0, 1);
        return 0;
    }
    start_helpers(team, nets, 1);
    step_part(nets, 0, 1);
    barrier(team);
    return 0;
}

/* Bytes/s probe: sums `floats` floats `repeats` times (the machine probe of the benchmarks). */
float charlstm_stream_sum(const float *data, int64_t floats, int32_t repeats)
{
    vec acc[4] = {{0}, {0}, {0}, {0}};
    for (int r = 0; r < repeats; r++)
        for (int64_t i = 0; i + 4 * LANES <= floats; i += 4 * LANES)
            for (int j = 0; j < 4; j++)
                acc[j] += load(data + i + j * LANES);
    vec total = acc[0] + acc[1] + acc[2] + acc[3];
    float sum = 0;
    for (int j = 0; j < LANES; j++)
        sum += total[j];
    return sum;
}

/* exp(x) in double for x <= 0, within about 1 ulp of libm's: Cody-Waite reduction to
 * |r| <= ln2/2, a degree-13 Taylor polynomial (truncation error below 1e-17), 2^n from the
 * exponent bits, in two factors so that results below 2^-1022 come out subnormal as libm's
 * do. x below -746 gives 0. Branch-free, so that the loop calling it is vectorised: libm's
 * exp, called one value at a time, was nearly all of the time of a draw over 5,000 symbols. */
static inline double exp_nonpositive(double x)
{
    x = x < -746.0 ? -746.0 : x;
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    const double shifted = x * 1.4426950408889634 + shifter;
    const double n = shifted - shifter;
    double r = x - n * 0.693147180369123816490; /* ln 2 in two parts */
    r = r - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t k, low;
    memcpy(&k, &shifted, sizeof k);
    k -= 0x4338000000000000LL;                 /* the integer n, from the shifted bits */
    const int64_t deep = k < -1000;            /* below 2^-1000: scale in two steps */
    k += deep * 1000;
    low = deep ? 0x0170000000000000LL : 0x3FF0000000000000LL; /* 2^-1000 or 1 */
    const int64_t high = (k + 1023) << 52;
    double a, b;
    memcpy(&a, &high, sizeof a);
    memcpy(&b, &low, sizeof b);
    return p * a * b;
}

#define SAMPLE_BLOCK 64

/* The largest of l[0..n): LANES running maxima side by side, one vector. */
static float row_max(const float *l, int n)
{
    vec best = {0};
    best += l[0];
    int j = 0;
    for (; j + LANES <= n; j += LANES) {
        const vec x = load(l + j);
        const wvec greater = (wvec)(x > best);
        best = (vec)((greater & (wvec)x) | (~greater & (wvec)best));
    }
    float top = best[0];
    for (int k = 1; k < LANES; k++)
        top = best[k] > top ? best[k] : top;
    for (; j < n; j++)
        top = l[j] > top ? l[j] : top;
    return top;
}

/* The weights exp((l[j] - top) * scale) of ids j0..j0+n (n <= SAMPLE_BLOCK) into w. */
static void tempered_block(const float *l, int j0, int n, float top, double scale, double *w)
{
    for (int j = 0; j < n; j++)
        w[j] = exp_nonpositive(((double)l[j0 + j] - top) * scale);
}

/* Their sum: 8 running sums side by side (vector lanes), then added in order. */
static double block_sum(const double *w, int n)
{
    double lanes[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++)
            lanes[k] += w[j + k];
    for (; j < n; j++)
        lanes[0] += w[j];
    double s = 0.0;
    for (int k = 0; k < 8; k++)
        s += lanes[k];
    return s;
}

/* Temperature sampling by inverse CDF, the rule of charlstm.generate's NumPy path: weights
 * exp((logit - max logit) / temperature) in double (the max first, so that a tiny
 * temperature gives 0 and -inf, never inf - inf); row r takes the first id whose running
 * weight exceeds u[r] * total (u < 1 - 2^-52, so a zero weight is never taken). The running
 * weight goes by blocks of 64 ids (each block's weights summed in vector lanes; the total is
 * the blocks' sums added in order), then through the chosen block's ids one by one: the
 * same distribution as a plain running sum, rounded differently in the last bits. */
void charlstm_sample(int32_t rows, int32_t vocab, int64_t stride, const float *logits,
                     const double *inv_temperature, const double *u, int64_t *out)
{
    const int blocks = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    double *sums = malloc((size_t)(blocks > 0 ? blocks : 1) * sizeof *sums);
    double w[SAMPLE_BLOCK];
    for (int r = 0; r < rows; r++) {
        const float *l = logits + r * stride;
        const double scale = inv_temperature[r];
        const float top = row_max(l, vocab);
        double total = 0.0;
        for (int b = 0; b < blocks; b++) {
            const int j0 = b * SAMPLE_BLOCK, n = vocab - j0 < SAMPLE_BLOCK ? vocab - j0 : SAMPLE_BLOCK;
            tempered_block(l, j0, n, top, scale, w);
            sums[b] = block_sum(w, n);
            total += sums[b];
        }
        const double target = u[r] * total;
        double running = 0.0;
        int b = 0;
        for (; b < blocks - 1 && running + sums[b] <= target; b++)
            running += sums[b];
        const int past_the_end = sums[b] == 0.0; /* rounding left the target at the total */
        while (b > 0 && sums[b] == 0.0)
            b--;
        const int j0 = b * SAMPLE_BLOCK, n = vocab - j0 < SAMPLE_BLOCK ? vocab - j0 : SAMPLE_BLOCK;
        tempered_block(l, j0, n, top, scale, w);
        int chosen = -1, last = 0; /* last: the block's last id of positive weight */
        for (int j = 0; j < n; j++) {
            if (w[j] == 0.0)
                continue;
            last = j;
            running += w[j];
            if (running > target && !past_the_end && chosen < 0)
                chosen = j;
        }
        out[r] = j0 + (chosen >= 0 ? chosen : last);
    }
    free(sums);
}

/* ------------------------------------------------------------------ adaptive head */

/* log(sum(exp(x[j] - top))) + top over n values: the log-normaliser of a softmax. */
static float log_sum_exp(const float *x, int n)
{
    const float top = row_max(x, n);
    float lanes[LANES] = {0};
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < LANES; k++)
            lanes[k] += exp_clamped(x[j + k] - top);
    for (; j < n; j++)
        lanes[0] += exp_clamped(x[j] - top);
    float sum = 0.0f;
    for (int k = 0; k < LANES; k++)
        sum += lanes[k];
    return top + logf(sum);
}

/* out[c] = bias[c] + sum_k x[k] w[k][c] for c < n: w row-major (K, n). Four vectors of
 * outputs at a time stay in registers over all k (one load per multiply-add). */
static void dense_row(int K, int n, const float *x, const float *w, const float *bias, float *out)
{
    int c0 = 0;
    for (; c0 + CHUNK <= n; c0 += CHUNK) {
        vec acc[VECS];
        for (int v = 0; v < VECS; v++)
            acc[v] = bias ? load(bias + c0 + v * LANES) : (vec){0};
        for (int k = 0; k < K; k++) {
            const float *wk = w + (long)k * n + c0;
            for (int v = 0; v < VECS; v++)
                acc[v] += x[k] * load(wk + v * LANES);
        }
        for (int v = 0; v < VECS; v++)
            store(out + c0 + v * LANES, acc[v]);
    }
    for (; c0 + LANES <= n; c0 += LANES) {
        vec acc = bias ? load(bias + c0) : (vec){0};
        for (int k = 0; k < K; k++)
            acc += x[k] * load(w + (long)k * n + c0);
        store(out + c0, acc);
    }
    for (int c = c0; c < n; c++) {
        float sum = bias ? bias[c] : 0.0f;
        for (int k = 0; k < K; k++)
            sum += x[k] * w[(long)k * n + c];
        out[c] = sum;
    }
}

/* Cluster i's members for one row: their scores in inner (n_i), and the shift that makes
 * inner[j] + shift their log-probabilities, given the cluster's head log-probability. */
static float cluster_scores(int H, const float *h, int dims, int n, const float *projection, const float *weights,
                            const float *bias, float head_log_prob, float *projected, float *inner)
{
    dense_row(H, dims, h, projection, 0, projected);
    dense_row(dims, n, projected, weights, bias, inner);
    return head_log_prob - log_sum_exp(inner, n);
}

/* Keeps the larger value, the smaller id on a tie: NumPy's argmax over ids in order. */
static inline void keep_best(float v, int32_t id, float *best, int64_t *best_id)
{
    if (v > *best || (v == *best && id < *best_id)) {
        *best = v;
        *best_id = id;
    }
}

/* out[i] = values[index[i]] for i < n (restrict: the compiler then uses vector gathers). */
static void gather(int n, const int32_t *restrict index, const float *restrict values, float *restrict out)
{
    for (int i = 0; i < n; i++)
        out[i] = values[index[i]];
}

/* The adaptive softmax head past its shortlist layer (charlstm.adaptive), for each of B rows:
 * first (B, shortlist + clusters; row stride first_stride) holds the shortlist layer's
 * outputs, top (B, H) the top layer's output. Cluster i (ranks bounds[i]..bounds[i+1]) is
 * projected to dims[i] features (projections[i]: (H, dims[i])), then to its members
 * (weights[i]: (dims[i], n_i), biases[i]). order[rank] is a symbol's id, ranks[id] its rank.
 * With out, writes the full distribution's log-probabilities in id order (row stride
 * out_stride): computed in rank order, then gathered (a gather vectorises, a scatter does
 * not). Without it, writes each row's most probable id to chosen, computing only the clusters
 * whose own probability is above the best symbol's found so far (a member's probability is at
 * most its cluster's): the same id as the argmax of out. scratch: dims max + V floats. */
void charlstm_adaptive_complete(int32_t B, int32_t H, const float *top, const float *first, int64_t first_stride,
                                int32_t clusters, const int32_t *bounds, const int32_t *dims,
                                const float *const *projections, const float *const *weights,
                                const float *const *biases, const int32_t *order, const int32_t *ranks,
                                float *scratch, float *out, int64_t out_stride, int64_t *chosen)
{
    const int shortlist = bounds[0], V = bounds[clusters];
    int widest = 0;
    for (int i = 0; i < clusters; i++)
        widest = dims[i] > widest ? dims[i] : widest;
    float *projected = scratch, *by_rank = scratch + widest;
    for (int b = 0; b < B; b++) {
        const float *f = first + b * first_stride, *h = top + (long)b * H;
        const float norm = log_sum_exp(f, shortlist + clusters);
        float best = -INFINITY;
        int64_t best_id = -1;
        for (int j = 0; j < shortlist; j++) {
            by_rank[j] = f[j] - norm;
            if (!out)
                keep_best(by_rank[j], order[j], &best, &best_id);
        }
        for (int i = 0; i < clusters; i++) {
            const int n = bounds[i + 1] - bounds[i];
            const float head_log_prob = f[shortlist + i] - norm;
            if (!out && head_log_prob + 1e-4f * (1.0f + fabsf(head_log_prob)) < best)
                continue; /* no member can win (the margin covers rounding) */
            float *inner = by_rank + bounds[i];
            const float shift = cluster_scores(H, h, dims[i], n, projections[i], weights[i], biases[i],
                                               head_log_prob, projected, inner);
            for (int j = 0; j < n; j++)
                inner[j] += shift;
            if (!out)
                for (int j = 0; j < n; j++)
                    keep_best(inner[j], order[bounds[i] + j], &best, &best_id);
        }
        if (out)
            gather(V, ranks, by_rank, out + b * out_stride);
        else
            chosen[b] = best_id;
    }
}

/* Lets the loader check that it talks to the file it compiled. */
int charlstm_abi_version(void) { return 5; }
