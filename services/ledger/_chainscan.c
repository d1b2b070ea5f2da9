/* The ledger verifier's hot loop in C: the same check as pilothouse.ledger.domain.scan_range (the pure-Python
 * reference), plus the Merkle pair hashing of pilothouse.ledger.merkle._pairs.
 *
 * scan(items, lo, chain, prev, first_seq, want_leaves, secondary, threads, prefix) -> (valid, last_hash, leaves, agree)
 *
 * checks items[lo:] as sequences first_seq, first_seq + 1, ... linked from `prev` (the chain's hash before it).
 *
 * Per entry (a tuple of 18): sequence == expected, prev_hash == the previous entry's stored hash, chain == chain,
 * then SHA-256(prefix || header JSON || "\n" || payload UTF-8) in lowercase hex must equal the stored entry_hash.
 * The header JSON is written here byte for byte as orjson writes it (see domain.canonical_entry_bytes), but only for
 * the "fast shape": every header field None, an exact int that fits in 64 bits, or an exact str of printable ASCII
 * without '"' or '\\' (which JSON writes verbatim). Anything else -- and any entry that does not verify -- ends the
 * valid prefix here: the Python caller checks that one entry with the reference code and resumes after it when it
 * passes. So this code never accepts an entry the reference would refuse; at worst it hands an odd one back.
 *
 * The header is built and the links compared with the GIL held; the SHA-256 of each entry is computed with the GIL
 * released, split over `threads` threads (no process fork, no copy of the entries). Each batch of entries is held
 * by a private copy of that part of the list while the GIL is released.
 *
 * agree: with a `secondary` list, how many leading entries of it equal the primary ones (tuple equality, as
 * `secondary[i] == items[i]`), compared up to the end of either list whatever the hash check found. Payloads are
 * compared by the hashing threads (see agree_deferred), the other fields before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#ifdef PILOTHOUSE_NO_OPENSSL_HEADERS
/* Built without OpenSSL's headers (Debian libssl-dev), against the libcrypto that Python's hashlib already uses: its
 * SHA256_CTX layout and these four functions have been the same since OpenSSL 0.9.8, through 1.1 and 3.x. */
typedef struct {
    unsigned int h[8];
    unsigned int Nl, Nh;
    unsigned int data[16];
    unsigned int num, md_len;
} SHA256_CTX;
int SHA256_Init(SHA256_CTX *c);
int SHA256_Update(SHA256_CTX *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, SHA256_CTX *c);
unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
#else
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define N_FIELDS 18
#define HEADER_FIELDS 16
#define BATCH 2048
#define MAX_THREADS 64

typedef struct {
    size_t hdr_off;          /* header JSON in the arena */
    size_t hdr_len;
    const unsigned char *payload;
    Py_ssize_t payload_len;
    const char *expected;    /* the stored entry_hash: 64 ASCII characters */
    /* The secondary source's payload, compared right after hashing (while the primary's is in cache); set only when
     * every other field of the secondary entry was found equal. */
    const void *pri_data, *sec_data;
    size_t cmp_bytes;
    int differs;             /* written by the hashing thread */
} job_t;


/* ------------------------------------------------------------------------------------ SHA-256 with SHA-NI --- */
/* OpenSSL hashes one message at a time; on x86 with the SHA extensions each SHA256RNDS2 waits for the previous one,
 * so a single message leaves the unit half idle. Two messages hashed side by side (their instructions interleave in
 * the out-of-order core) nearly double the rate. This is FIPS 180-4 SHA-256 written with Intel's SHA intrinsics, in
 * the layout of Intel's reference code; tests compare it with hashlib on every length from 0 to 300 bytes and more,
 * and `use_shani(False)` switches back to OpenSSL. Used only when CPUID says the CPU has SHA, SSSE3 and SSE4.1. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SHANI 1
#include <cpuid.h>
#include <immintrin.h>

#define SHANI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};
static const uint32_t H256[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

static int cpu_has_shani(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 9)) || !(c & (1u << 19)))  /* SSSE3, SSE4.1 */
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1;  /* SHA */
}

typedef struct {
    __m128i abef, cdgh;
} shani_state;

SHANI_TARGET static inline shani_state shani_init(void) {
    __m128i tmp = _mm_loadu_si128((const __m128i *)&H256[0]);
    __m128i s1 = _mm_loadu_si128((const __m128i *)&H256[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);  /* CDAB */
    s1 = _mm_shuffle_epi32(s1, 0x1B);    /* EFGH */
    shani_state st = {_mm_alignr_epi8(tmp, s1, 8), _mm_blend_epi16(s1, tmp, 0xF0)};  /* ABEF, CDGH */
    return st;
}

SHANI_TARGET static inline void shani_digest(shani_state st, unsigned char out[32]) {
    __m128i tmp = _mm_shuffle_epi32(st.abef, 0x1B);  /* FEBA */
    __m128i s1 = _mm_shuffle_epi32(st.cdgh, 0xB1);   /* DCHG */
    __m128i s0 = _mm_blend_epi16(tmp, s1, 0xF0);     /* DCBA */
    s1 = _mm_alignr_epi8(s1, tmp, 8);                /* HGFE */
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(s0, bswap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(s1, bswap));
}

/* One 64-byte block into each of two states (the second may be the first's twin: `two` = 0 hashes one). Message
 * words in groups of four: W[g] for g >= 4 is msg2(msg1(W[g-4], W[g-3]) + (W[g-2]:W[g-1] shifted one word), W[g-1]);
 * a ring of four registers holds W[g-4 .. g-1]. */
#define SHANI_ROUNDS(ST, W, P, G)                                                                                 \
    do {                                                                                                          \
        __m128i cur_;                                                                                             \
        if ((G) < 4) {                                                                                            \
            cur_ = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((P) + 16 * (G))), bswap);                   \
        } else {                                                                                                  \
            __m128i x_ = _mm_sha256msg1_epu32(W[(G) & 3], W[((G) + 1) & 3]);                                      \
            x_ = _mm_add_epi32(x_, _mm_alignr_epi8(W[((G) + 3) & 3], W[((G) + 2) & 3], 4));                       \
            cur_ = _mm_sha256msg2_epu32(x_, W[((G) + 3) & 3]);                                                    \
        }                                                                                                         \
        W[(G) & 3] = cur_;                                                                                        \
        __m128i m_ = _mm_add_epi32(cur_, _mm_loadu_si128((const __m128i *)&K256[4 * (G)]));                       \
        ST.cdgh = _mm_sha256rnds2_epu32(ST.cdgh, ST.abef, m_);                                                    \
        ST.abef = _mm_sha256rnds2_epu32(ST.abef, ST.cdgh, _mm_shuffle_epi32(m_, 0x0E));                           \
    } while (0)

SHANI_TARGET static void shani_blocks2(shani_state *a, const unsigned char *pa, shani_state *b,
                                       const unsigned char *pb, size_t nblocks) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    shani_state x = *a, y = *b;
    for (size_t k = 0; k < nblocks; k++, pa += 64, pb += 64) {
        shani_state x0 = x, y0 = y;
        __m128i wa[4], wb[4];
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            SHANI_ROUNDS(x, wa, pa, g);
            SHANI_ROUNDS(y, wb, pb, g);
        }
        x.abef = _mm_add_epi32(x.abef, x0.abef);
        x.cdgh = _mm_add_epi32(x.cdgh, x0.cdgh);
        y.abef = _mm_add_epi32(y.abef, y0.abef);
        y.cdgh = _mm_add_epi32(y.cdgh, y0.cdgh);
    }
    *a = x;
    *b = y;
}

SHANI_TARGET static void shani_blocks1(shani_state *a, const unsigned char *pa, size_t nblocks) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    shani_state x = *a;
    for (size_t k = 0; k < nblocks; k++, pa += 64) {
        shani_state x0 = x;
        __m128i wa[4];
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++)
            SHANI_ROUNDS(x, wa, pa, g);
        x.abef = _mm_add_epi32(x.abef, x0.abef);
        x.cdgh = _mm_add_epi32(x.cdgh, x0.cdgh);
    }
    *a = x;
}

/* SHA-256 of two padded messages (na and nb blocks) side by side. */
SHANI_TARGET static void shani_hash2(const unsigned char *a, size_t na, const unsigned char *b, size_t nb,
                                     unsigned char da[32], unsigned char db[32]) {
    shani_state x = shani_init(), y = shani_init();
    size_t common = na < nb ? na : nb;
    shani_blocks2(&x, a, &y, b, common);
    if (na > common)
        shani_blocks1(&x, a + 64 * common, na - common);
    if (nb > common)
        shani_blocks1(&y, b + 64 * common, nb - common);
    shani_digest(x, da);
    shani_digest(y, db);
}

SHANI_TARGET static void shani_hash1(const unsigned char *a, size_t na, unsigned char da[32]) {
    shani_state x = shani_init();
    shani_blocks1(&x, a, na);
    shani_digest(x, da);
}

static int g_shani = 0;  /* set at import: the CPU has the SHA extensions (use_shani() may turn it off) */
#else
static int g_shani = 0;
#endif

/* A message buffer: the parts, then FIPS 180-4 padding (0x80, zeros, the bit length big-endian) to whole blocks. */
typedef struct {
    unsigned char *buf;
    size_t cap;
} msgbuf_t;

/* Number of 64-byte blocks, or 0 when out of memory (the caller then hashes with OpenSSL). */
static size_t pad_message(msgbuf_t *m, const unsigned char *p1, size_t n1, const unsigned char *p2, size_t n2,
                          const unsigned char *p3, size_t n3) {
    size_t len = n1 + n2 + n3, total = (len + 9 + 63) & ~(size_t)63;
    if (total > m->cap) {
        unsigned char *b = realloc(m->buf, total);
        if (b == NULL)
            return 0;
        m->buf = b;
        m->cap = total;
    }
    if (n1)
        memcpy(m->buf, p1, n1);
    if (n2)
        memcpy(m->buf + n1, p2, n2);
    if (n3)
        memcpy(m->buf + n1 + n2, p3, n3);
    m->buf[len] = 0x80;
    memset(m->buf + len + 1, 0, total - len - 9);
    uint64_t bits = (uint64_t)len * 8;
    for (int k = 0; k < 8; k++)
        m->buf[total - 1 - k] = (unsigned char)(bits >> (8 * k));
    return total / 64;
}

/* The jobs of one batch, shared by the threads that hash them: each takes the next CHUNK jobs until none are left,
 * so a thread whose core is busy elsewhere holds up at most one chunk (the others, this one included, take the rest)
 * and two threads are never much slower than one. */
#define CHUNK 32

static const char HEXDIGITS[] = "0123456789abcdef";

typedef struct {
    const SHA256_CTX *base;
    const unsigned char *prefix;  /* what `base` has taken (for the SHA-NI path, which builds whole messages) */
    size_t prefix_len;
    const unsigned char *arena;
    job_t *jobs;
    Py_ssize_t n;
    unsigned char *leaves;        /* 32 bytes per job, from index 0 of the batch */
    _Atomic Py_ssize_t next;      /* the first job no thread has taken yet */
    _Atomic Py_ssize_t first_bad; /* the first job whose digest does not match (n while none) */
} hash_batch_t;

static int past_bad(hash_batch_t *t, Py_ssize_t i) {
    return i > atomic_load_explicit(&t->first_bad, memory_order_relaxed);
}

/* The stored hash of job i against its digest (NULL: not computed, the job lies past a bad one); the leaf; the
 * deferred payload comparison (always: the agreeing prefix does not stop at a bad hash). */
static void check_job(hash_batch_t *t, Py_ssize_t i, const unsigned char *digest) {
    job_t *j = &t->jobs[i];
    if (j->sec_data != NULL)
        j->differs = memcmp(j->pri_data, j->sec_data, j->cmp_bytes) != 0;
    if (digest == NULL || past_bad(t, i))
        return;
    char hex[64];
    for (int k = 0; k < 32; k++) {
        hex[2 * k] = HEXDIGITS[digest[k] >> 4];
        hex[2 * k + 1] = HEXDIGITS[digest[k] & 15];
    }
    if (memcmp(hex, j->expected, 64) != 0) {
        Py_ssize_t seen = atomic_load(&t->first_bad);
        while (i < seen && !atomic_compare_exchange_weak(&t->first_bad, &seen, i)) {
        }
    } else if (t->leaves != NULL) {
        memcpy(t->leaves + 32 * i, digest, 32);
    }
}

static void openssl_digest(const hash_batch_t *t, const job_t *j, unsigned char digest[32]) {
    SHA256_CTX c = *t->base;
    SHA256_Update(&c, t->arena + j->hdr_off, j->hdr_len);
    SHA256_Update(&c, j->payload, (size_t)j->payload_len);
    SHA256_Final(digest, &c);
}

#ifdef HAVE_SHANI
/* Jobs [lo, hi) two at a time with the SHA extensions (OpenSSL for a message too large to copy). */
static void shani_jobs(hash_batch_t *t, Py_ssize_t lo, Py_ssize_t hi, msgbuf_t *m1, msgbuf_t *m2) {
    unsigned char d1[32], d2[32];
    Py_ssize_t i = lo;
    for (; i + 1 < hi; i += 2) {
        const job_t *a = &t->jobs[i], *b = &t->jobs[i + 1];
        if (past_bad(t, i)) {  /* only the payload comparisons are still wanted */
            check_job(t, i, NULL);
            check_job(t, i + 1, NULL);
            continue;
        }
        size_t na = pad_message(m1, t->prefix, t->prefix_len, t->arena + a->hdr_off, a->hdr_len, a->payload,
                                (size_t)a->payload_len);
        size_t nb = pad_message(m2, t->prefix, t->prefix_len, t->arena + b->hdr_off, b->hdr_len, b->payload,
                                (size_t)b->payload_len);
        if (na && nb) {
            shani_hash2(m1->buf, na, m2->buf, nb, d1, d2);
        } else {
            openssl_digest(t, a, d1);
            openssl_digest(t, b, d2);
        }
        check_job(t, i, d1);
        check_job(t, i + 1, d2);
    }
    if (i < hi) {
        const job_t *a = &t->jobs[i];
        size_t na = past_bad(t, i) ? 0 : pad_message(m1, t->prefix, t->prefix_len, t->arena + a->hdr_off,
                                                    a->hdr_len, a->payload, (size_t)a->payload_len);
        if (na)
            shani_hash1(m1->buf, na, d1);
        else if (!past_bad(t, i))
            openssl_digest(t, a, d1);
        check_job(t, i, past_bad(t, i) ? NULL : d1);
    }
}
#endif

static void *hash_worker(void *arg) {
    hash_batch_t *t = (hash_batch_t *)arg;
    unsigned char d[32];
    msgbuf_t m1 = {NULL, 0}, m2 = {NULL, 0};
    for (;;) {
        Py_ssize_t lo = atomic_fetch_add(&t->next, CHUNK);
        if (lo >= t->n)
            break;
        Py_ssize_t hi = lo + CHUNK < t->n ? lo + CHUNK : t->n;
#ifdef HAVE_SHANI
        if (g_shani) {
            shani_jobs(t, lo, hi, &m1, &m2);
            continue;
        }
#endif
        for (Py_ssize_t i = lo; i < hi; i++) {
            int skip = past_bad(t, i);
            if (!skip)
                openssl_digest(t, &t->jobs[i], d);
            check_job(t, i, skip ? NULL : d);
        }
    }
    free(m1.buf);
    free(m2.buf);
    return NULL;
}

/* Hash jobs [0, n) on up to `threads` threads (this one included); returns the first index whose digest does not
 * match (n when all do). */
static Py_ssize_t hash_jobs(const SHA256_CTX *base, const Py_buffer *prefix, const unsigned char *arena, job_t *jobs,
                            Py_ssize_t n, unsigned char *leaves, int threads) {
    if (threads > n / 256)
        threads = (int)(n / 256);  /* a thread for fewer entries costs more than it saves */
    if (threads < 1)
        threads = 1;
    hash_batch_t t;
    t.base = base;
    t.prefix = prefix->buf;
    t.prefix_len = (size_t)prefix->len;
    t.arena = arena;
    t.jobs = jobs;
    t.n = n;
    t.leaves = leaves;
    atomic_init(&t.next, 0);
    atomic_init(&t.first_bad, n);
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 1; k < threads; k++)
        started[k] = pthread_create(&tids[k], NULL, hash_worker, &t) == 0;  /* none to be had: fewer share it */
    hash_worker(&t);
    for (int k = 1; k < threads; k++)
        if (started[k])
            pthread_join(tids[k], NULL);
    return atomic_load(&t.first_bad);
}

/* ------------------------------------------------------------------------------------------ the header JSON --- */
typedef struct {
    unsigned char *buf;
    size_t len, cap;
} arena_t;

static int arena_reserve(arena_t *a, size_t more) {
    if (a->len + more <= a->cap)
        return 0;
    size_t cap = a->cap ? a->cap : 1 << 16;
    while (cap < a->len + more)
        cap *= 2;
    unsigned char *b = PyMem_Realloc(a->buf, cap);
    if (b == NULL)
        return -1;
    a->buf = b;
    a->cap = cap;
    return 0;
}

/* Whether JSON writes these ASCII bytes verbatim: every byte in 0x20..0x7e except '"' and '\\'. Eight bytes at a
 * time with the exact "has a byte less than / equal to" word tests (no false negatives; bytes are < 0x80 here). */
static inline int json_verbatim(const unsigned char *s, Py_ssize_t n) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, q, b, d;
        memcpy(&x, s + i, 8);
        q = x ^ (ones * 0x22);
        b = x ^ (ones * 0x5c);
        d = x ^ (ones * 0x7f);
        if (((x - ones * 0x20) & ~x & highs) | ((q - ones) & ~q & highs) | ((b - ones) & ~b & highs) |
            ((d - ones) & ~d & highs))
            return 0;
    }
    for (; i < n; i++) {
        unsigned char ch = s[i];
        if (ch < 0x20 || ch > 0x7e || ch == '"' || ch == '\\')
            return 0;
    }
    return 1;
}

/* 1: written; 0: not the fast shape (the caller hands the entry back); -1: out of memory. */
static int write_value(arena_t *a, PyObject *v) {
    if (v == Py_None) {
        if (arena_reserve(a, 4) < 0)
            return -1;
        memcpy(a->buf + a->len, "null", 4);
        a->len += 4;
        return 1;
    }
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        char tmp[24];
        int n = 0;
        unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
        do {
            tmp[n++] = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        if (arena_reserve(a, (size_t)n + 1) < 0)
            return -1;
        if (x < 0)
            a->buf[a->len++] = '-';
        while (n)
            a->buf[a->len++] = (unsigned char)tmp[--n];
        return 1;
    }
    if (PyUnicode_CheckExact(v) && PyUnicode_IS_COMPACT_ASCII(v)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(v);
        const unsigned char *s = (const unsigned char *)PyUnicode_DATA(v);
        if (!json_verbatim(s, n))
            return 0;
        if (arena_reserve(a, (size_t)n + 2) < 0)
            return -1;
        a->buf[a->len++] = '"';
        memcpy(a->buf + a->len, s, (size_t)n);
        a->len += (size_t)n;
        a->buf[a->len++] = '"';
        return 1;
    }
    return 0;
}

/* Exact str equality without a method call (PEP 393 strings are canonical: another kind means another string). */
static int same_exact_str(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    if (!PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b))
        return -1;  /* not both exact str: let the reference decide */
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    if (n != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b))
        return 0;
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

/* `a == b` for two entries (tuples compare field by field); -1 with an exception set if a comparison raised. */
static int entries_equal(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    if (!PyTuple_Check(a) || !PyTuple_Check(b))
        return PyObject_RichCompareBool(a, b, Py_EQ);
    Py_ssize_t n = PyTuple_GET_SIZE(a);
    if (n != PyTuple_GET_SIZE(b))
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyTuple_GET_ITEM(a, i), *y = PyTuple_GET_ITEM(b, i);
        int eq = same_exact_str(x, y);
        if (eq < 0)
            eq = PyObject_RichCompareBool(x, y, Py_EQ);
        if (eq != 1)
            return eq;
    }
    return 1;
}

/* ------------------------------------------------------------------------------------------------- scan() --- */
/* Compare secondary[i] with primary[i] (both lists, read while holding the GIL; bounds re-read each time because a
 * comparison may run Python code). 1 equal, 0 not (or out of range), -1 error. */
static int agree_at(PyObject *primary, PyObject *secondary, Py_ssize_t i) {
    if (i >= PyList_GET_SIZE(primary) || i >= PyList_GET_SIZE(secondary))
        return 0;
    PyObject *a = PyList_GET_ITEM(secondary, i), *b = PyList_GET_ITEM(primary, i);
    Py_INCREF(a);
    Py_INCREF(b);
    int eq = entries_equal(a, b);
    Py_DECREF(a);
    Py_DECREF(b);
    return eq;
}

/* Like agree_at, but a payload (field 16) that is an exact str on both sides with the same length and kind is left to
 * the hashing threads: *row gets a new reference to the secondary entry (kept until they are done) and the job the
 * two data pointers. 1 equal (or deferred), 0 not, -1 error. */
static int agree_deferred(PyObject *e, PyObject *secondary, Py_ssize_t i, job_t *j, PyObject **row) {
    if (i >= PyList_GET_SIZE(secondary))
        return 0;
    PyObject *r = PyList_GET_ITEM(secondary, i);
    if (r == e)
        return 1;
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != N_FIELDS) {
        Py_INCREF(r);
        int eq = entries_equal(r, e);
        Py_DECREF(r);
        return eq;
    }
    Py_INCREF(r);
    PyObject *p = PyTuple_GET_ITEM(e, 16), *q = PyTuple_GET_ITEM(r, 16);
    int eq = 1;
    for (Py_ssize_t f = 0; f < N_FIELDS && eq == 1; f++) {
        if (f == 16)
            continue;
        PyObject *x = PyTuple_GET_ITEM(r, f), *y = PyTuple_GET_ITEM(e, f);
        eq = same_exact_str(x, y);
        if (eq < 0)
            eq = PyObject_RichCompareBool(x, y, Py_EQ);
    }
    if (eq == 1 && p != q) {
        if (PyUnicode_CheckExact(p) && PyUnicode_CheckExact(q) && PyUnicode_KIND(p) == PyUnicode_KIND(q)
                && PyUnicode_GET_LENGTH(p) == PyUnicode_GET_LENGTH(q)) {
            j->pri_data = PyUnicode_DATA(p);
            j->sec_data = PyUnicode_DATA(q);
            j->cmp_bytes = (size_t)PyUnicode_GET_LENGTH(p) * PyUnicode_KIND(p);
            *row = r;  /* keeps q alive while the GIL is released */
            return 1;
        }
        eq = same_exact_str(q, p);
        if (eq < 0)
            eq = PyObject_RichCompareBool(q, p, Py_EQ);
    }
    Py_DECREF(r);
    return eq;
}

/* One more agreeing entry, or the end of the agreeing prefix; -1 passes a comparison's error on. */
static inline int tally(int eq, Py_ssize_t *agree, int *agreeing) {
    if (eq < 0)
        return -1;
    if (eq)
        (*agree)++;
    else
        *agreeing = 0;
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *items_in, *chain, *prev, *secondary;
    Py_ssize_t lo, first_seq;
    int want_leaves, threads;
    Py_buffer prefix;
    if (!PyArg_ParseTuple(args, "O!nUUnpOiy*", &PyList_Type, &items_in, &lo, &chain, &prev, &first_seq, &want_leaves,
                          &secondary, &threads, &prefix))
        return NULL;
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    Py_ssize_t n = PyList_GET_SIZE(items_in);
    if (secondary != Py_None && (!PyList_Check(secondary) || lo != 0)) {
        PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "secondary must be a list (or None), compared from index 0 only");
        return NULL;
    }
    if (lo < 0 || lo > n) {
        PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "lo outside the list");
        return NULL;
    }
    PyObject *result = NULL, *batch = NULL;
    unsigned char *leaves = NULL;
    job_t *jobs = NULL;
    PyObject **temps = NULL;  /* UTF-8 copies of non-ASCII payloads */
    PyObject **rows = NULL;   /* secondary entries whose payloads the hashing threads compare */
    arena_t arena = {NULL, 0, 0};
    SHA256_CTX base;
    Py_ssize_t valid = 0, agree = 0;
    int agreeing = secondary != Py_None;
    PyObject *last = prev;  /* borrowed from prev or from an entry kept alive by `keep` */
    PyObject *keep = NULL;  /* the batch holding `last` */
    jobs = PyMem_Malloc(sizeof(job_t) * BATCH);
    temps = PyMem_Calloc(BATCH, sizeof(PyObject *));
    rows = PyMem_Calloc(BATCH, sizeof(PyObject *));
    if (want_leaves && n > lo)
        leaves = PyMem_Malloc((size_t)(n - lo) * 32);
    if (jobs == NULL || temps == NULL || rows == NULL || (want_leaves && n > lo && leaves == NULL)) {
        PyErr_NoMemory();
        goto done;
    }
    SHA256_Init(&base);
    SHA256_Update(&base, prefix.buf, (size_t)prefix.len);

    /* Batches start small (an entry handed back early costs little) and grow to BATCH. */
    Py_ssize_t size = 64;
    for (Py_ssize_t pos = lo; pos < n; pos += size, size = size * 2 < BATCH ? size * 2 : BATCH) {
        Py_ssize_t end = pos + size < n ? pos + size : n, i;
        /* A private copy of the batch: its entries stay alive (and in place) while the GIL is released. */
        batch = PyList_GetSlice(items_in, pos, end);
        if (batch == NULL)
            goto done;
        end = pos + PyList_GET_SIZE(batch);
        arena.len = 0;
        PyObject *last_before = last;
        for (i = pos; i < end; i++) {
            PyObject *e = PyList_GET_ITEM(batch, i - pos);
            job_t *j = &jobs[i - pos];
            temps[i - pos] = NULL;
            rows[i - pos] = NULL;
            j->sec_data = NULL;
            j->differs = 0;
            if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != N_FIELDS)
                break;
            PyObject *seq = PyTuple_GET_ITEM(e, 1), *hash = PyTuple_GET_ITEM(e, 17), *payload = PyTuple_GET_ITEM(e, 16);
            if (!PyLong_CheckExact(seq) || PyLong_AsSsize_t(seq) != first_seq + (i - lo)) {
                PyErr_Clear();
                break;
            }
            if (same_exact_str(PyTuple_GET_ITEM(e, 3), last) != 1 || same_exact_str(PyTuple_GET_ITEM(e, 0), chain) != 1)
                break;
            if (!PyUnicode_CheckExact(hash) || !PyUnicode_IS_COMPACT_ASCII(hash) || PyUnicode_GET_LENGTH(hash) != 64)
                break;
            if (!PyUnicode_CheckExact(payload))
                break;
            j->hdr_off = arena.len;
            if (arena_reserve(&arena, 1) < 0) {
                PyErr_NoMemory();
                goto done;
            }
            arena.buf[arena.len++] = '[';
            int ok = 1;
            for (int f = 0; f < HEADER_FIELDS && ok == 1; f++) {
                if (f) {
                    if (arena_reserve(&arena, 1) < 0) {
                        ok = -1;
                        break;
                    }
                    arena.buf[arena.len++] = ',';
                }
                ok = write_value(&arena, PyTuple_GET_ITEM(e, f));
            }
            if (ok < 0 || arena_reserve(&arena, 2) < 0) {
                PyErr_NoMemory();
                goto done;
            }
            if (ok == 0)
                break;
            arena.buf[arena.len++] = ']';
            arena.buf[arena.len++] = '\n';
            j->hdr_len = arena.len - j->hdr_off;
            if (PyUnicode_IS_COMPACT_ASCII(payload)) {
                j->payload = (const unsigned char *)PyUnicode_DATA(payload);
                j->payload_len = PyUnicode_GET_LENGTH(payload);
            } else {
                PyObject *b = PyUnicode_AsUTF8String(payload);
                if (b == NULL) {  /* lone surrogates: the reference says what is wrong */
                    PyErr_Clear();
                    break;
                }
                temps[i - pos] = b;
                j->payload = (const unsigned char *)PyBytes_AS_STRING(b);
                j->payload_len = PyBytes_GET_SIZE(b);
            }
            j->expected = (const char *)PyUnicode_DATA(hash);
            last = hash;
            /* this entry's fields now; its payload, if left to the hashing threads, then */
            if (agreeing && tally(agree_deferred(e, secondary, i, j, &rows[i - pos]), &agree, &agreeing) < 0)
                goto done;
        }
        Py_ssize_t ready = i - pos, good;
        Py_BEGIN_ALLOW_THREADS
        good = hash_jobs(&base, &prefix, arena.buf, jobs, ready, leaves ? leaves + 32 * (pos - lo) : NULL, threads);
        Py_END_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < ready; k++) {
            Py_CLEAR(temps[k]);
            Py_CLEAR(rows[k]);
        }
        for (Py_ssize_t k = 0; k < ready; k++) {
            if (jobs[k].sec_data != NULL && jobs[k].differs) {  /* the first payload that differs ends it */
                if (pos + k < agree)
                    agree = pos + k;
                agreeing = 0;
                break;
            }
        }
        valid = pos - lo + good;
        if (good) {  /* the last valid entry's hash is what the next entry (or chunk) must link to */
            last = PyTuple_GET_ITEM(PyList_GET_ITEM(batch, good - 1), 17);
            Py_XSETREF(keep, batch);
        } else {
            last = last_before;  /* lives in `keep` (or is prev) */
            Py_DECREF(batch);
        }
        batch = NULL;
        if (good < end - pos)
            break;
    }
    if (valid == 0)
        last = prev;
    /* The agreeing prefix does not depend on the hash check: finish comparing where the scan stopped. */
    while (agreeing)
        if (tally(agree_at(items_in, secondary, agree), &agree, &agreeing) < 0)
            goto done;
    {
        PyObject *lv = PyBytes_FromStringAndSize(leaves ? (const char *)leaves : "", leaves ? valid * 32 : 0);
        if (lv == NULL)
            goto done;
        if (secondary != Py_None)
            result = Py_BuildValue("(nONn)", valid, last, lv, agree);
        else
            result = Py_BuildValue("(nONO)", valid, last, lv, Py_None);
    }
done:
    for (Py_ssize_t k = 0; k < BATCH; k++) {
        if (temps != NULL)
            Py_XDECREF(temps[k]);
        if (rows != NULL)
            Py_XDECREF(rows[k]);
    }
    PyMem_Free(temps);
    PyMem_Free(rows);
    PyMem_Free(jobs);
    PyMem_Free(leaves);
    PyMem_Free(arena.buf);
    Py_XDECREF(batch);
    Py_XDECREF(keep);
    PyBuffer_Release(&prefix);
    return result;
}

/* -------------------------------------------------------------------------------------------------- pairs() --- */
typedef struct {
    const unsigned char *in;
    unsigned char *out;
    Py_ssize_t lo, hi;
} pair_task_t;

static void *pair_range(void *arg) {
    pair_task_t *t = (pair_task_t *)arg;
    SHA256_CTX node;
    unsigned char one = 1;
    Py_ssize_t i = t->lo;
#ifdef HAVE_SHANI
    if (g_shani) {  /* 0x01 || left || right is 65 bytes: two blocks once padded */
        unsigned char a[128], b[128];
        size_t na = 0;
        msgbuf_t ma = {a, sizeof a}, mb = {b, sizeof b};
        for (; i + 1 < t->hi; i += 2) {
            na = pad_message(&ma, &one, 1, t->in + 64 * i, 64, NULL, 0);
            pad_message(&mb, &one, 1, t->in + 64 * (i + 1), 64, NULL, 0);
            shani_hash2(a, na, b, na, t->out + 32 * i, t->out + 32 * (i + 1));
        }
    }
#endif
    for (; i < t->hi; i++) {
        SHA256_Init(&node);
        SHA256_Update(&node, &one, 1);
        SHA256_Update(&node, t->in + 64 * i, 64);
        SHA256_Final(t->out + 32 * i, &node);
    }
    return NULL;
}

/* pairs(level: bytes-like, threads) -> bytes: SHA-256(0x01 || left || right) of consecutive 32-byte pairs. */
static PyObject *pairs(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer in;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "y*|i", &in, &threads))
        return NULL;
    Py_ssize_t n = in.len / 64;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 32);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    if (threads > n / 1024)
        threads = (int)(n / 1024);
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    pair_task_t tasks[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (int k = 0; k < threads; k++) {
        tasks[k].in = in.buf;
        tasks[k].out = o;
        tasks[k].lo = n * k / threads;
        tasks[k].hi = n * (k + 1) / threads;
        started[k] = k ? pthread_create(&tids[k], NULL, pair_range, &tasks[k]) == 0 : 0;
    }
    pair_range(&tasks[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            pair_range(&tasks[k]);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    return out;
}

/* use_shani(on) -> bool: hash with the SHA extensions (when the CPU has them) or with OpenSSL; returns the setting. */
static PyObject *use_shani(PyObject *self, PyObject *arg) {
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
#ifdef HAVE_SHANI
    g_shani = on && cpu_has_shani();
#endif
    return PyBool_FromLong(g_shani);
}

/* sha256_batch(messages) -> list of digests, two at a time as scan() hashes entries (for the tests). */
static PyObject *sha256_batch(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "messages must be a sequence of bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    msgbuf_t m1 = {NULL, 0}, m2 = {NULL, 0};
    unsigned char d1[32], d2[32];
    for (Py_ssize_t i = 0; out != NULL && i < n; i += 2) {
        PyObject *a = PySequence_Fast_GET_ITEM(seq, i), *b = i + 1 < n ? PySequence_Fast_GET_ITEM(seq, i + 1) : NULL;
        if (!PyBytes_Check(a) || (b != NULL && !PyBytes_Check(b))) {
            PyErr_SetString(PyExc_TypeError, "messages must be bytes");
            Py_CLEAR(out);
            break;
        }
        const unsigned char *pa = (const unsigned char *)PyBytes_AS_STRING(a);
        size_t la = (size_t)PyBytes_GET_SIZE(a);
        const unsigned char *pb = b ? (const unsigned char *)PyBytes_AS_STRING(b) : NULL;
        size_t lb = b ? (size_t)PyBytes_GET_SIZE(b) : 0;
        int done = 0;
#ifdef HAVE_SHANI
        if (g_shani) {
            size_t na = pad_message(&m1, pa, la, NULL, 0, NULL, 0);
            size_t nb = b ? pad_message(&m2, pb, lb, NULL, 0, NULL, 0) : 0;
            if (na && (nb || !b)) {
                if (b)
                    shani_hash2(m1.buf, na, m2.buf, nb, d1, d2);
                else
                    shani_hash1(m1.buf, na, d1);
                done = 1;
            }
        }
#endif
        if (!done) {
            SHA256(pa, la, d1);
            if (b)
                SHA256(pb, lb, d2);
        }
        PyList_SET_ITEM(out, i, PyBytes_FromStringAndSize((const char *)d1, 32));
        if (b)
            PyList_SET_ITEM(out, i + 1, PyBytes_FromStringAndSize((const char *)d2, 32));
    }
    free(m1.buf);
    free(m2.buf);
    Py_DECREF(seq);
    return out;
}

static PyObject *sha_engine(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(g_shani ? "sha-ni, two messages at a time" : "openssl");
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(items, lo, chain, prev, first_seq, want_leaves, secondary, threads, prefix)"},
    {"pairs", pairs, METH_VARARGS, "pairs(level, threads=1): Merkle parents of consecutive 32-byte hash pairs"},
    {"use_shani", use_shani, METH_O, "use_shani(on) -> bool: SHA extensions (if the CPU has them) or OpenSSL"},
    {"sha_engine", sha_engine, METH_NOARGS, "sha_engine() -> how entries are hashed now"},
    {"sha256_batch", sha256_batch, METH_O, "sha256_batch(messages) -> digests, hashed as scan() hashes entries"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chainscan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__chainscan(void) {
#ifdef HAVE_SHANI
    g_shani = cpu_has_shani();
#endif
    return PyModule_Create(&module);
}
