/* Fused CPU kernels for the spike-and-GMM guide (float32), loaded by guides/kernels.py.
 *
 * Per weight j with latent x_j and a K-level codebook (c_k, a_k, mu_k) the logits are
 *     l_jk = c_k - z_jk^2 / 2,   z_jk = (x_j - mu_k) a_k
 * (c_k = (log pi_k - log s_k) / tau, a_k = 1 / (s_k sqrt(tau))); components outside the
 * weight's window are excluded. As in guides/distributions.py the shifted logits
 * d_jk = l_jk - max_m l_jm are clipped below at FLOOR (no gradient where clipped) and
 *     log phi_jk = S_jk - log sum_m exp(S_jm),   S = max(d, FLOOR).
 *
 * phi_dot:   out_j = sum_k phi_jk v_k                                  (KL term, expected weight)
 * st_sample: index_j = argmax_k p_jk,  p_jk = log phi_jk - log(-log U_jk)   (Gumbel-max: exact draw)
 *            value_j = mu_{index_j} + s_{index_j} eps_j
 *            backward: straight-through gradient of the relaxed one-hot
 *            soft_j = softmax(max(p_j / t - max_k p_jk / t, FLOOR)) through
 *            value_j + sum_k (soft_jk - stop_grad(soft_jk)) (mu_k + s_k eps_j).
 * U_jk comes from a counter-based generator (SplitMix64 finaliser of seed + counter), so the
 * backward pass regenerates the same noise instead of storing N x K intermediates: every
 * forward quantity is recomputed in the backward pass and memory traffic is O(N).
 *
 * LANES weights are processed together as one vector (GCC/Clang vector extensions) with the
 * component loop outside; exp and log are the Cephes polynomials on vectors (~1 ulp), so
 * nothing depends on -ffast-math. Parameter gradients are accumulated per lane in double.
 * Subnormal results are flushed to zero during a call (phi_jk reaches e^-86 ~ 4e-38, and
 * products of such values are otherwise computed ~100x slower); this changes values only
 * below 1.2e-38.
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define LANES 16
#define KMAX 256
#define FLOOR (-80.0f)
#define OUTSIDE (-1.0e30f)

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint64_t vu64 __attribute__((vector_size(LANES * 8)));
typedef double vd __attribute__((vector_size(LANES * 8)));

int64_t sqs_kernel_kmax(void) { return KMAX; }

/* Flush subnormals to zero (x86 MXCSR FTZ + DAZ) and return the previous control state. */
static unsigned int flush_subnormals(void) {
#if defined(__SSE__)
    unsigned int state = _mm_getcsr();
    _mm_setcsr(state | 0x8040);
    return state;
#else
    return 0;
#endif
}

static void restore_float_state(unsigned int state) {
#if defined(__SSE__)
    _mm_setcsr(state);
#else
    (void)state;
#endif
}

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf sel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline vd widen(vf x) { return __builtin_convertvector(x, vd); }

/* exp(x), x clamped to [-87, 88] (Cephes expf). */
static inline vf vexp(vf x) {
    x = vmax(x, splat(-87.0f));
    x = sel(x > 88.0f, splat(88.0f), x);
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf y = p * r * r + r + 1.0f;
    return y * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

/* log(x) for positive normal x (Cephes logf). */
static inline vf vlog(vf x) {
    vi i = (vi)x;
    vi e = ((i >> 23) & 0xff) - 126;
    vf m = (vf)((i & 0x807fffff) | 0x3f000000); /* x = m 2^e, m in [0.5, 1) */
    vi small = m < 0.707106781186547524f;
    e = e + small; /* small is -1 where true */
    m = sel(small, m + m - 1.0f, m - 1.0f);
    vf z = m * m;
    vf y = splat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    vf fe = __builtin_convertvector(e, vf);
    y = y + fe * -2.12194440e-4f;
    y = y - z * 0.5f;
    return m + y + fe * 0.693359375f;
}

/* Gumbel perturbation log(-log U) for counters c: U uniform on [2^-24, 1 - 2^-24] (23 bits). */
static inline vf neg_gumbel(uint64_t seed, vu64 counter) {
    vu64 z = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    vf u = (__builtin_convertvector(__builtin_convertvector(z >> 41, vi), vf) + 0.5f) * (1.0f / 8388608.0f);
    return vlog(-vlog(u));
}

typedef struct {
    int64_t K;
    const int64_t *win, *cw; /* window of each weight (NULL: one window), of each level */
    const float *c, *a, *mu;
} Codebook;

typedef struct {
    vf x;
    vi w;
    vf z[KMAX];  /* (x - mu_k) a_k */
    vf d[KMAX];  /* shifted logits before the clip (about OUTSIDE outside the window) */
    vf lp[KMAX]; /* log phi */
    vf ph[KMAX]; /* phi (when asked for) */
    vf g[KMAX];  /* scratch: perturbed logits, gradients */
} Block;

/* Lane-wise double accumulators of the codebook gradients. */
typedef struct {
    vd c[KMAX], a[KMAX], mu[KMAX], v[KMAX];
} Accumulators;

static void *zalloc(size_t size) {
    void *p = aligned_alloc(64, (size + 63) / 64 * 64);
    if (p) __builtin_memset(p, 0, size);
    return p;
}

static void reduce_lanes(const vd *acc, int64_t K, double *out) {
    for (int64_t k = 0; k < K; k++)
        for (int i = 0; i < LANES; i++) out[k] += acc[k][i];
}

static vf load_f(const float *src, int64_t j0, int64_t m) {
    vf v = splat(0.0f);
    for (int64_t i = 0; i < m; i++) v[i] = src[j0 + i];
    return v;
}

/* Weights j0 .. j0 + m - 1 (parameter index j mod nparam); other lanes get x = 0. */
static void load(Block *b, const Codebook *cb, const float *x, int64_t j0, int64_t m, int64_t nparam) {
    b->x = splat(0.0f);
    b->w = (vi){0};
    for (int64_t i = 0; i < m; i++) {
        int64_t p = j0 + i < nparam ? j0 + i : (j0 + i) % nparam;
        b->x[i] = x[p];
        if (cb->win) b->w[i] = (int32_t)cb->win[p];
    }
}

static void log_phi_block(Block *b, const Codebook *cb, int with_phi) {
    const int64_t K = cb->K;
    vf mx = splat(OUTSIDE), sum = splat(0.0f);
    for (int64_t k = 0; k < K; k++) {
        vf z = (b->x - cb->mu[k]) * cb->a[k];
        vf l = cb->c[k] - 0.5f * z * z;
        if (cb->win) l = sel(b->w != (int32_t)cb->cw[k], splat(OUTSIDE), l);
        b->z[k] = z;
        b->d[k] = l;
        mx = vmax(l, mx);
    }
    for (int64_t k = 0; k < K; k++) {
        vf d = b->d[k] - mx;
        vf s = vmax(d, splat(FLOOR));
        b->d[k] = d;
        b->lp[k] = s;
        sum += vexp(s);
    }
    sum = vlog(sum);
    for (int64_t k = 0; k < K; k++) b->lp[k] -= sum;
    if (with_phi)
        for (int64_t k = 0; k < K; k++) b->ph[k] = vexp(b->lp[k]);
}

/* Given dL/dlog phi in b->g, accumulate the gradients of the logits' inputs and return dL/dx:
 * log-softmax backward dS_k = g_k - phi_k sum_m g_m (zero where clipped), then dc_k += dl_k,
 * dz_k = -z_k dl_k, dx += dz_k a_k, dmu_k -= dz_k a_k, da_k += dz_k (x - mu_k). */
static vf logits_backward(const Block *b, const Codebook *cb, Accumulators *acc) {
    const int64_t K = cb->K;
    vf total = splat(0.0f), dx = splat(0.0f);
    for (int64_t k = 0; k < K; k++) total += b->g[k];
    for (int64_t k = 0; k < K; k++) {
        vf ds = b->g[k] - b->ph[k] * total;
        vf dl = sel(b->d[k] >= FLOOR, ds, splat(0.0f));
        vf dz = -b->z[k] * dl;
        dx += dz * cb->a[k];
        acc->c[k] += widen(dl);
        acc->mu[k] -= widen(dz * cb->a[k]);
        acc->a[k] += widen(dz * (b->x - cb->mu[k]));
    }
    return dx;
}

static void finish(Accumulators *acc, int64_t K, double *dc, double *da, double *dmu, double *dv) {
    reduce_lanes(acc->c, K, dc);
    reduce_lanes(acc->a, K, da);
    reduce_lanes(acc->mu, K, dmu);
    if (dv) reduce_lanes(acc->v, K, dv);
}

/* Returns 0, or -1 when memory is short (nothing written). */
static int64_t phi_dot_forward(int64_t n, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                            const float *c, const float *a, const float *mu, const float *v, float *out) {
    Codebook cb = {K, win, cw, c, a, mu};
    Block *b = zalloc(sizeof(Block));
    if (!b) return -1;
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        int64_t m = n - j0 < LANES ? n - j0 : LANES;
        load(b, &cb, x, j0, m, n);
        log_phi_block(b, &cb, 1);
        vf o = splat(0.0f);
        for (int64_t k = 0; k < K; k++) o += b->ph[k] * v[k];
        for (int64_t i = 0; i < m; i++) out[j0 + i] = o[i];
    }
    free(b);
    return 0;
}

int64_t sqs_phi_dot_forward(int64_t n, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                            const float *c, const float *a, const float *mu, const float *v, float *out) {
    unsigned int state = flush_subnormals();
    int64_t status = phi_dot_forward(n, K, x, win, cw, c, a, mu, v, out);
    restore_float_state(state);
    return status;
}

/* dv_k += sum_j dout_j phi_jk; dlog phi_jk = dout_j phi_jk v_k. */
static int64_t phi_dot_backward(int64_t n, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                             const float *c, const float *a, const float *mu, const float *v, const float *dout,
                             float *dx, double *dc, double *da, double *dmu, double *dv) {
    Codebook cb = {K, win, cw, c, a, mu};
    Block *b = zalloc(sizeof(Block));
    Accumulators *acc = zalloc(sizeof(Accumulators));
    if (!b || !acc) { free(b); free(acc); return -1; }
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        int64_t m = n - j0 < LANES ? n - j0 : LANES;
        load(b, &cb, x, j0, m, n);
        log_phi_block(b, &cb, 1);
        vf go = load_f(dout, j0, m);
        for (int64_t k = 0; k < K; k++) {
            vf gp = go * b->ph[k];
            b->g[k] = gp * v[k];
            acc->v[k] += widen(gp);
        }
        vf dxl = logits_backward(b, &cb, acc);
        for (int64_t i = 0; i < m; i++) dx[j0 + i] = dxl[i];
    }
    finish(acc, K, dc, da, dmu, dv);
    free(acc);
    free(b);
    return 0;
}

int64_t sqs_phi_dot_backward(int64_t n, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                             const float *c, const float *a, const float *mu, const float *v, const float *dout,
                             float *dx, double *dc, double *da, double *dmu, double *dv) {
    unsigned int state = flush_subnormals();
    int64_t status = phi_dot_backward(n, K, x, win, cw, c, a, mu, v, dout, dx, dc, da, dmu, dv);
    restore_float_state(state);
    return status;
}

/* Perturbed logits p_jk (into b->g) and the Gumbel-max index (first maximum) of a block. */
static vi perturb_block(Block *b, const Codebook *cb, uint64_t seed, int64_t j0) {
    vf best = splat(-3.0e38f);
    vi idx = (vi){0};
    vu64 counter;
    for (int i = 0; i < LANES; i++) counter[i] = (uint64_t)(j0 + i) * (uint64_t)cb->K;
    for (int64_t k = 0; k < cb->K; k++) {
        vf p = b->lp[k] - neg_gumbel(seed, counter + (uint64_t)k);
        vi better = p > best;
        b->g[k] = p;
        best = sel(better, p, best);
        idx = (better & (int32_t)k) | (~better & idx);
    }
    return idx;
}

static int64_t st_forward(int64_t n, int64_t nparam, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                       const float *c, const float *a, const float *mu, const float *s, const float *eps,
                       uint64_t seed, float *value) {
    Codebook cb = {K, win, cw, c, a, mu};
    Block *b = zalloc(sizeof(Block));
    if (!b) return -1;
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        int64_t m = n - j0 < LANES ? n - j0 : LANES;
        load(b, &cb, x, j0, m, nparam);
        log_phi_block(b, &cb, 0);
        vi idx = perturb_block(b, &cb, seed, j0);
        for (int64_t i = 0; i < m; i++) value[j0 + i] = mu[idx[i]] + s[idx[i]] * eps[j0 + i];
    }
    free(b);
    return 0;
}

int64_t sqs_st_forward(int64_t n, int64_t nparam, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                       const float *c, const float *a, const float *mu, const float *s, const float *eps,
                       uint64_t seed, float *value) {
    unsigned int state = flush_subnormals();
    int64_t status = st_forward(n, nparam, K, x, win, cw, c, a, mu, s, eps, seed, value);
    restore_float_state(state);
    return status;
}

static int64_t st_backward(int64_t n, int64_t nparam, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                        const float *c, const float *a, const float *mu, const float *s, const float *eps,
                        uint64_t seed, float t, const float *dvalue,
                        float *dx, double *dc, double *da, double *dmu, double *ds) {
    Codebook cb = {K, win, cw, c, a, mu};
    Block *b = zalloc(sizeof(Block));
    Accumulators *acc = zalloc(sizeof(Accumulators));
    if (!b || !acc) { free(b); free(acc); return -1; }
    for (int64_t j0 = 0; j0 < n; j0 += LANES) {
        int64_t m = n - j0 < LANES ? n - j0 : LANES;
        load(b, &cb, x, j0, m, nparam);
        log_phi_block(b, &cb, 1);
        vi idx = perturb_block(b, &cb, seed, j0);
        vf gv = load_f(dvalue, j0, m), ep = load_f(eps, j0, m);
        vf rmax = splat(-3.0e38f), sum = splat(0.0f), dot = splat(0.0f);
        for (int64_t k = 0; k < K; k++) {
            b->g[k] = b->g[k] / t; /* r = p / t */
            rmax = vmax(b->g[k], rmax);
        }
        /* soft_k = e_k / sum e; d soft_k = dv (mu_k + s_k eps); dlog phi_k = soft_k (d soft_k - <soft, d soft>) / t;
         * the sign of e marks the clipped entries (no gradient). */
        for (int64_t k = 0; k < K; k++) {
            vf r = b->g[k] - rmax;
            vf e = vexp(vmax(r, splat(FLOOR)));
            b->g[k] = sel(r >= FLOOR, e, -e);
            sum += e;
            dot += e * (gv * (mu[k] + s[k] * ep));
        }
        vf inv = 1.0f / sum;
        dot *= inv;
        for (int64_t k = 0; k < K; k++) {
            vf e = b->g[k];
            vf soft = sel(e < 0.0f, -e, e) * inv;
            vf grad = soft * (gv * (mu[k] + s[k] * ep) - dot);
            b->g[k] = sel(e < 0.0f, splat(0.0f), grad / t);
        }
        vf dxl = logits_backward(b, &cb, acc);
        for (int64_t i = 0; i < m; i++) {
            dx[j0 + i] = dxl[i];
            dmu[idx[i]] += gv[i];
            ds[idx[i]] += gv[i] * ep[i];
        }
    }
    finish(acc, K, dc, da, dmu, NULL);
    free(acc);
    free(b);
    return 0;
}

int64_t sqs_st_backward(int64_t n, int64_t nparam, int64_t K, const float *x, const int64_t *win, const int64_t *cw,
                        const float *c, const float *a, const float *mu, const float *s, const float *eps,
                        uint64_t seed, float t, const float *dvalue,
                        float *dx, double *dc, double *da, double *dmu, double *ds) {
    unsigned int state = flush_subnormals();
    int64_t status = st_backward(n, nparam, K, x, win, cw, c, a, mu, s, eps, seed, t, dvalue, dx, dc, da, dmu, ds);
    restore_float_state(state);
    return status;
}
