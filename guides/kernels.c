/* Fused CPU kernels for the spike-and-GMM guide (float32), loaded by guides/kernels.py.
 *
 * Per weight j with latent x_j and a K-level codebook (c_k, a_k, mu_k, s_k) the logits are
 *     l_jk = c_k - z_jk^2 / 2,   z_jk = (x_j - mu_k) a_k
 * (c_k = (log pi_k - log s_k) / tau, a_k = 1 / (s_k sqrt(tau))); components outside the
 * weight's window are excluded. As in guides/distributions.py the shifted logits
 * d_jk = l_jk - max_m l_jm are clipped below at FLOOR (no gradient where clipped):
 *     S = max(d, FLOOR),   log phi_jk = S_jk - log sum_m exp(S_jm).
 *
 * sqs_phi_dot_*: out_j = sum_k phi_jk v_k.
 * sqs_phi_argmax: codes_j = argmax_k phi_jk (first maximum).
 * sqs_layer_*:   one pass over a weight tensor computing its sample and its KL bound:
 *   gate     learned: g_j = sigmoid(theta_j); in sample mode a straight-through relaxed
 *            Bernoulli z_j = [y_j > 1/2], y_j = sigmoid(clip((theta_j + log u_j - log(1 - u_j)) / t_g, +-80));
 *            fixed: g_j = z_j = gate_fixed_j.
 *   value    sample mode: Gumbel-max index k_j = argmax_k p_jk, p_jk = log phi_jk - log(-log U_jk)
 *            (an exact draw from Categorical(phi_j)), value_j = mu_{k_j} + s_{k_j} eps_j, whose
 *            gradient is the straight-through gradient of soft_j = softmax(max(p_j / t - max_k p_jk / t, FLOOR))
 *            through value_j + sum_k (soft_jk - stop_grad(soft_jk)) (mu_k + s_k eps_j);
 *            expected mode: value_j = sum_k phi_jk mu_k and z_j = g_j.
 *   output   w_j = z_j value_j;  kl_j = KL_Bern(g_j || lam) + g_j sum_k phi_jk B_k.
 * U_jk and u_j come from a counter-based generator (SplitMix64 finaliser of seed + counter), so
 * the backward pass regenerates the same noise instead of storing N x K intermediates: every
 * forward quantity is recomputed in the backward pass and memory traffic is O(N).
 *
 * LANES weights are processed together as one vector (GCC/Clang vector extensions) with the
 * component loop outside; exp and log are the Cephes polynomials on vectors (~1 ulp), so
 * nothing depends on -ffast-math. Codebook gradients are summed per lane in float over
 * FLUSH blocks, then in double. Subnormal results are flushed to zero during a call (phi_jk
 * reaches e^-86 ~ 4e-38, and products of such values are otherwise ~100x slower); this
 * changes values only below 1.2e-38.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define LANES 16
#define KMAX 256
#define FLUSH 64
#define FLOOR (-80.0f)
#define OUTSIDE (-1.0e30f)

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint64_t vu64 __attribute__((vector_size(LANES * 8)));
typedef double vd __attribute__((vector_size(LANES * 8)));
typedef int8_t vb __attribute__((vector_size(LANES)));

int64_t sqs_kernel_kmax(void) { return KMAX; }

/* ------------------------------------------------------------------ vector math */

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf sel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
static inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

/* exp(x) for x in [-87, 88] (Cephes expf). */
static inline vf vexp_in_range(vf x) {
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

static inline vf vexp(vf x) { return vexp_in_range(vmin(vmax(x, splat(-87.0f)), splat(88.0f))); }

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

/* log(1 + e) for e in [0, 1], accurate for small e (Goldberg's trick). */
static inline vf vlog1p(vf e) {
    vf u = 1.0f + e;
    vf d = u - 1.0f;
    return sel(d == 0.0f, e, vlog(u) * (e / sel(d == 0.0f, splat(1.0f), d)));
}

/* 64 random bits per counter (SplitMix64 finaliser); two 23-bit uniforms on [2^-24, 1 - 2^-24]. */
static inline vu64 random_bits(uint64_t seed, vu64 counter) {
    vu64 z = seed + (counter + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline vf to_uniform(vu64 bits23) {
    return (__builtin_convertvector(__builtin_convertvector(bits23, vi), vf) + 0.5f) * (1.0f / 8388608.0f);
}

static inline vf uniform_high(vu64 z) { return to_uniform(z >> 41); }
static inline vf uniform_low(vu64 z) { return to_uniform((z >> 9) & 0x7fffff); }

/* ------------------------------------------------------------------ floating-point state */

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

/* ------------------------------------------------------------------ blocks of LANES weights */

typedef struct {
    int64_t n, nparam, K;        /* elements (sample_shape x weights), weights, levels */
    int64_t expected;            /* 0: sample, 1: expected weight */
    const float *x;              /* latent weights (nparam) */
    const float *theta;          /* gate logits (nparam) or NULL */
    const float *gate_fixed;     /* fixed gates (nparam) when theta is NULL */
    const int8_t *win;           /* window of each weight (NULL: one window) */
    const int64_t *cw;           /* window of each level */
    const float *c, *a, *mu, *s; /* codebook terms (K) */
    const float *v;              /* K-vector: B for the layer's KL (NULL: no KL), v for phi_dot */
    const float *eps;            /* standard normal noise (n), sample mode */
    uint64_t seed;
    float t_assign, t_gate, log_lam, log1m_lam;
    float *w, *kl;               /* forward outputs (n); kl only with v */
    const float *dw, *dkl;       /* backward inputs (n); NULL means zero */
    float *dx, *dtheta;          /* backward outputs (n) */
    double *dc, *da, *dmu, *ds, *dv; /* backward outputs (K), accumulated */
    int64_t *codes;              /* argmax_k phi_jk (n) */
} Args;

typedef struct {
    vf x, theta, gfix, eps, dw, dkl;
    vi w;
    vf z[KMAX];  /* (x - mu_k) a_k */
    vf d[KMAX];  /* shifted logits before the clip (about OUTSIDE outside the window) */
    vf lp[KMAX]; /* log phi */
    vf ph[KMAX]; /* phi */
    vf g[KMAX];  /* scratch: perturbed logits, then dL/dlog phi */
} Block;

enum { ACC_C, ACC_A, ACC_MU, ACC_S, ACC_V, ACC_N };

/* Per-lane gradient sums of the K-vectors: float within FLUSH blocks, then double. */
typedef struct {
    vf f[ACC_N][KMAX];
    vd d[ACC_N][KMAX];
    int64_t blocks;
} Accumulators;

static void *zalloc(size_t size) {
    size = (size + 63) / 64 * 64;
    void *p = aligned_alloc(64, size);
    if (p) __builtin_memset(p, 0, size);
    return p;
}

static void flush(Accumulators *acc, int64_t K) {
    for (int q = 0; q < ACC_N; q++)
        for (int64_t k = 0; k < K; k++) {
            acc->d[q][k] += __builtin_convertvector(acc->f[q][k], vd);
            acc->f[q][k] = splat(0.0f);
        }
}

static void next_block(Accumulators *acc, int64_t K) {
    if (++acc->blocks % FLUSH == 0) flush(acc, K);
}

static void finish(Accumulators *acc, const Args *p) {
    double *out[ACC_N] = {p->dc, p->da, p->dmu, p->ds, p->dv};
    flush(acc, p->K);
    for (int q = 0; q < ACC_N; q++)
        if (out[q])
            for (int64_t k = 0; k < p->K; k++)
                for (int i = 0; i < LANES; i++) out[q][k] += acc->d[q][k][i];
}

/* src[j0 .. j0 + m - 1] as a vector (pad in the other lanes). */
static vf load_f(const float *src, int64_t j0, int64_t m, float pad) {
    vf v = splat(pad);
    if (src && m == LANES)
        memcpy(&v, src + j0, sizeof v);
    else if (src)
        for (int64_t i = 0; i < m; i++) v[i] = src[j0 + i];
    return v;
}

static void store_f(float *dst, vf v, int64_t j0, int64_t m) {
    if (m == LANES)
        memcpy(dst + j0, &v, sizeof v);
    else
        for (int64_t i = 0; i < m; i++) dst[j0 + i] = v[i];
}

/* Elements j0 .. j0 + m - 1 (weight j mod nparam); other lanes get x = 0 and zero gradients. */
static void load(Block *b, const Args *p, int64_t j0, int64_t m) {
    const int64_t start = j0 < p->nparam ? j0 : j0 % p->nparam;
    if (m == LANES && start + LANES <= p->nparam) {
        b->x = load_f(p->x, start, m, 0.0f);
        b->theta = load_f(p->theta, start, m, 0.0f);
        b->gfix = load_f(p->gate_fixed, start, m, 0.0f);
        vb w = {0};
        if (p->win) memcpy(&w, p->win + start, sizeof w);
        b->w = __builtin_convertvector(w, vi);
    } else {
        b->x = b->theta = b->gfix = splat(0.0f);
        b->w = (vi){0};
        for (int64_t i = 0; i < m; i++) {
            int64_t q = (start + i) % p->nparam;
            b->x[i] = p->x[q];
            if (p->theta) b->theta[i] = p->theta[q];
            if (p->gate_fixed) b->gfix[i] = p->gate_fixed[q];
            if (p->win) b->w[i] = (int32_t)p->win[q];
        }
    }
    b->eps = load_f(p->eps, j0, m, 0.0f);
    b->dw = load_f(p->dw, j0, m, 0.0f);
    b->dkl = load_f(p->dkl, j0, m, 0.0f);
}

/* z, d, log phi and phi of a block. */
static void log_phi_block(Block *b, const Args *p) {
    const int64_t K = p->K;
    vf mx = splat(OUTSIDE), sum = splat(0.0f);
    for (int64_t k = 0; k < K; k++) {
        vf z = (b->x - p->mu[k]) * p->a[k];
        vf l = p->c[k] - 0.5f * z * z;
        if (p->win) l = sel(b->w != (int32_t)p->cw[k], splat(OUTSIDE), l);
        b->z[k] = z;
        b->d[k] = l;
        mx = vmax(l, mx);
    }
    for (int64_t k = 0; k < K; k++) {
        vf d = b->d[k] - mx;
        vf s = vmax(d, splat(FLOOR));
        vf e = vexp_in_range(s);
        b->d[k] = d;
        b->lp[k] = s;
        b->ph[k] = e;
        sum += e;
    }
    vf inv = 1.0f / sum, log_sum = vlog(sum);
    for (int64_t k = 0; k < K; k++) {
        b->lp[k] -= log_sum;
        b->ph[k] *= inv;
    }
}

static vf phi_dot_block(const Block *b, const float *v, int64_t K) {
    vf o = splat(0.0f);
    for (int64_t k = 0; k < K; k++) o += b->ph[k] * v[k];
    return o;
}

/* Perturbed logits p_jk (into b->g), the Gumbel-max index (first maximum) and the chosen level's
 * mu and s. The uniforms of levels 2h and 2h + 1 share one 64-bit draw at counter j ceil(K / 2) + h. */
typedef struct {
    vf best, mu, s;
    vi idx;
} Choice;

static inline void perturb(Block *b, const Args *p, int64_t k, vf u, Choice *ch) {
    vf pk = b->lp[k] - vlog(-vlog(u));
    vi better = pk > ch->best;
    b->g[k] = pk;
    ch->best = sel(better, pk, ch->best);
    ch->mu = sel(better, splat(p->mu[k]), ch->mu);
    ch->s = sel(better, splat(p->s[k]), ch->s);
    ch->idx = (better & (int32_t)k) | (~better & ch->idx);
}

static Choice perturb_block(Block *b, const Args *p, int64_t j0) {
    const int64_t half = (p->K + 1) / 2;
    Choice ch = {splat(-3.0e38f), splat(0.0f), splat(0.0f), (vi){0}};
    vu64 counter;
    for (int i = 0; i < LANES; i++) counter[i] = (uint64_t)(j0 + i) * (uint64_t)half;
    for (int64_t h = 0; h < half; h++) {
        vu64 bits = random_bits(p->seed, counter + (uint64_t)h);
        perturb(b, p, 2 * h, uniform_high(bits), &ch);
        if (2 * h + 1 < p->K) perturb(b, p, 2 * h + 1, uniform_low(bits), &ch);
    }
    return ch;
}

/* Gate of a block: inclusion g (and 1 - g), the forward gate z, and the relaxed y for the
 * straight-through gradient (sample mode, learned gates; counter n * ceil(K / 2) + j). */
typedef struct {
    vf g, gm, z, y, in_range;
} Gate;

static Gate gate_block(const Block *b, const Args *p, int64_t j0) {
    Gate q;
    if (!p->theta) {
        q.g = q.z = b->gfix;
        q.gm = 1.0f - b->gfix;
        q.y = q.in_range = splat(0.0f);
        return q;
    }
    vf e = vexp(-vabs(b->theta)), inv = 1.0f / (1.0f + e);
    vi pos = b->theta >= 0.0f;
    q.g = sel(pos, inv, e * inv);
    q.gm = sel(pos, e * inv, inv);
    q.z = q.g;
    q.y = q.in_range = splat(0.0f);
    if (!p->expected) {
        vu64 counter;
        for (int i = 0; i < LANES; i++) counter[i] = (uint64_t)p->n * (uint64_t)((p->K + 1) / 2) + (uint64_t)(j0 + i);
        vf u = uniform_high(random_bits(p->seed, counter));
        u = vmin(vmax(u, splat(1e-6f)), splat(1.0f - 1e-6f));
        vf noisy = (b->theta + vlog(u) - vlog(1.0f - u)) / p->t_gate;
        q.in_range = sel((noisy >= FLOOR) & (noisy <= -FLOOR), splat(1.0f), splat(0.0f));
        q.y = 1.0f / (1.0f + vexp(-vmin(vmax(noisy, splat(FLOOR)), splat(-FLOOR))));
        q.z = sel(q.y > 0.5f, splat(1.0f), splat(0.0f));
    }
    return q;
}

/* KL(Bern(g) || Bern(lam)); learned gates: log g = -softplus(-theta), log(1 - g) = -softplus(theta). */
static vf bernoulli_kl(const Block *b, const Gate *q, const Args *p) {
    vf log_g, log_gm;
    if (p->theta) {
        vf l1p = vlog1p(vexp(-vabs(b->theta)));
        log_g = -(vmax(-b->theta, splat(0.0f)) + l1p);
        log_gm = -(vmax(b->theta, splat(0.0f)) + l1p);
    } else {
        log_g = sel(q->g > 0.0f, vlog(sel(q->g > 0.0f, q->g, splat(1.0f))), splat(0.0f));
        log_gm = sel(q->gm > 0.0f, vlog(sel(q->gm > 0.0f, q->gm, splat(1.0f))), splat(0.0f));
    }
    return q->g * (log_g - p->log_lam) + q->gm * (log_gm - p->log1m_lam);
}

/* Given dL/dlog phi in b->g, accumulate the gradients of the logits' inputs and return dL/dx:
 * log-softmax backward dS_k = g_k - phi_k sum_m g_m (zero where clipped), then dc_k += dl_k,
 * dz_k = -z_k dl_k, dx += dz_k a_k, dmu_k -= dz_k a_k, da_k += dz_k (x - mu_k). */
static vf logits_backward(const Block *b, const Args *p, Accumulators *acc) {
    const int64_t K = p->K;
    vf total = splat(0.0f), dx = splat(0.0f);
    for (int64_t k = 0; k < K; k++) total += b->g[k];
    for (int64_t k = 0; k < K; k++) {
        vf ds = b->g[k] - b->ph[k] * total;
        vf dl = sel(b->d[k] >= FLOOR, ds, splat(0.0f));
        vf dz = -b->z[k] * dl;
        dx += dz * p->a[k];
        acc->f[ACC_C][k] += dl;
        acc->f[ACC_MU][k] -= dz * p->a[k];
        acc->f[ACC_A][k] += dz * (b->x - p->mu[k]);
    }
    return dx;
}

/* dlog phi_k of the relaxed one-hot (into b->g, which holds the perturbed logits p_k): with
 * soft_k = e_k / sum e and d soft_k = dvalue m_k, m_k = mu_k + s_k eps, the softmax backward
 * soft_k (d soft_k - <soft, d soft>) / t = e_k (dvalue / sum e) (m_k - <soft, m>) / t; zero where clipped. */
static void relaxed_backward(Block *b, const Args *p, vf dvalue) {
    const int64_t K = p->K;
    const float inv_t = 1.0f / p->t_assign;
    vf rmax = splat(-3.0e38f), sum = splat(0.0f), dot = splat(0.0f);
    for (int64_t k = 0; k < K; k++) {
        b->g[k] = b->g[k] * inv_t;
        rmax = vmax(b->g[k], rmax);
    }
    for (int64_t k = 0; k < K; k++) {
        vf r = b->g[k] - rmax;
        vf e = vexp_in_range(vmax(r, splat(FLOOR)));
        b->g[k] = sel(r >= FLOOR, e, -e); /* the sign marks the clipped entries */
        sum += e;
        dot += e * (p->mu[k] + p->s[k] * b->eps);
    }
    vf inv_sum = 1.0f / sum, mean = dot * inv_sum, scale = dvalue * inv_sum * inv_t;
    for (int64_t k = 0; k < K; k++) {
        vf e = b->g[k];
        vf grad = vabs(e) * scale * (p->mu[k] + p->s[k] * b->eps - mean);
        b->g[k] = sel(e < 0.0f, splat(0.0f), grad);
    }
}

/* ------------------------------------------------------------------ entry points */

static int64_t layer(const Args *p, int backward) {
    Block *b = zalloc(sizeof(Block));
    Accumulators *acc = backward ? zalloc(sizeof(Accumulators)) : NULL;
    if (!b || (backward && !acc)) {
        free(b);
        free(acc);
        return -1;
    }
    const int64_t K = p->K;
    for (int64_t j0 = 0; j0 < p->n; j0 += LANES) {
        const int64_t m = p->n - j0 < LANES ? p->n - j0 : LANES;
        load(b, p, j0, m);
        log_phi_block(b, p);
        Gate q = gate_block(b, p, j0);
        vf slab = p->v ? phi_dot_block(b, p->v, K) : splat(0.0f);
        vf value;
        vi idx = (vi){0};
        if (p->expected) {
            value = phi_dot_block(b, p->mu, K);
        } else {
            Choice ch = perturb_block(b, p, j0);
            value = ch.mu + ch.s * b->eps;
            idx = ch.idx;
        }
        if (!backward) {
            store_f(p->w, q.z * value, j0, m);
            if (p->v) store_f(p->kl, bernoulli_kl(b, &q, p) + q.g * slab, j0, m);
            continue;
        }
        /* w = z value: d value = dw z, d z = dw value; kl = bern + g slab: d slab = dkl g. */
        vf dvalue = b->dw * q.z, dslab = b->dkl * q.g, ggm = q.g * q.gm;
        vf dtheta = b->dkl * ggm * (b->theta - (p->log_lam - p->log1m_lam) + slab);
        if (p->expected) {
            dtheta += b->dw * value * ggm;
            for (int64_t k = 0; k < K; k++) b->g[k] = splat(0.0f);
        } else {
            dtheta += b->dw * value * q.y * (1.0f - q.y) * q.in_range / p->t_gate;
            relaxed_backward(b, p, dvalue);
        }
        for (int64_t k = 0; k < K; k++) {
            /* the phi-weighted sums: dlog phi_k += phi_k (dmean mu_k + dslab B_k); sample mode: the
             * chosen level's mu_k and s_k get dvalue and dvalue eps */
            vf dB = p->v ? dslab * b->ph[k] : splat(0.0f);
            vf dmu = p->expected ? dvalue * b->ph[k] : sel(idx == (int32_t)k, dvalue, splat(0.0f));
            b->g[k] += (p->expected ? dmu * p->mu[k] : splat(0.0f)) + (p->v ? dB * p->v[k] : splat(0.0f));
            acc->f[ACC_MU][k] += dmu;
            acc->f[ACC_V][k] += dB;
            if (!p->expected) acc->f[ACC_S][k] += sel(idx == (int32_t)k, dvalue * b->eps, splat(0.0f));
        }
        store_f(p->dx, logits_backward(b, p, acc), j0, m);
        if (p->theta) store_f(p->dtheta, dtheta, j0, m);
        next_block(acc, K);
    }
    if (backward) finish(acc, p);
    free(acc);
    free(b);
    return 0;
}

/* Returns 0, or -1 when memory is short. */
/* Runs one pass with subnormals flushed to zero, restoring the caller's float state. */
static int64_t without_subnormals(int64_t (*pass)(const Args *, int), const Args *p, int backward) {
    unsigned int state = flush_subnormals();
    int64_t status = pass(p, backward);
    restore_float_state(state);
    return status;
}

int64_t sqs_layer_forward(const Args *p) { return without_subnormals(layer, p, 0); }

int64_t sqs_layer_backward(const Args *p) { return without_subnormals(layer, p, 1); }

/* out_j = sum_k phi_jk v_k, forward (p->w = out) and backward (p->dw = dout; dx, dc, da, dmu, dv). */
static int64_t phi_dot(const Args *p, int backward) {
    Block *b = zalloc(sizeof(Block));
    Accumulators *acc = backward ? zalloc(sizeof(Accumulators)) : NULL;
    if (!b || (backward && !acc)) {
        free(b);
        free(acc);
        return -1;
    }
    for (int64_t j0 = 0; j0 < p->n; j0 += LANES) {
        const int64_t m = p->n - j0 < LANES ? p->n - j0 : LANES;
        load(b, p, j0, m);
        log_phi_block(b, p);
        if (!backward) {
            store_f(p->w, phi_dot_block(b, p->v, p->K), j0, m);
            continue;
        }
        for (int64_t k = 0; k < p->K; k++) {
            vf gp = b->dw * b->ph[k];
            b->g[k] = gp * p->v[k];
            acc->f[ACC_V][k] += gp;
        }
        store_f(p->dx, logits_backward(b, p, acc), j0, m);
        next_block(acc, p->K);
    }
    if (backward) finish(acc, p);
    free(acc);
    free(b);
    return 0;
}

int64_t sqs_phi_dot_forward(const Args *p) { return without_subnormals(phi_dot, p, 0); }

int64_t sqs_phi_dot_backward(const Args *p) { return without_subnormals(phi_dot, p, 1); }

/* codes_j = argmax_k phi_jk (the first maximum); ``unused`` keeps the pass signature. */
static int64_t phi_argmax(const Args *p, int unused) {
    (void)unused;
    Block *b = zalloc(sizeof(Block));
    if (!b) return -1;
    for (int64_t j0 = 0; j0 < p->n; j0 += LANES) {
        const int64_t m = p->n - j0 < LANES ? p->n - j0 : LANES;
        load(b, p, j0, m);
        log_phi_block(b, p);
        vf best = b->lp[0];
        vi idx = (vi){0};
        for (int64_t k = 1; k < p->K; k++) {
            vi better = b->lp[k] > best;
            best = sel(better, b->lp[k], best);
            idx = (better & (int32_t)k) | (~better & idx);
        }
        for (int64_t i = 0; i < m; i++) p->codes[j0 + i] = idx[i];
    }
    free(b);
    return 0;
}

int64_t sqs_phi_argmax(const Args *p) { return without_subnormals(phi_argmax, p, 0); }
