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
 * `secondary[i] == items[i]`), compared up to the end of either list whatever the hash check found.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#ifdef PILOTHOUSE_NO_OPENSSL_HEADERS
/* Built without OpenSSL's headers (Debian libssl-dev), against the libcrypto that Python's hashlib already uses: its
 * SHA256_CTX layout and these three functions have been the same since OpenSSL 0.9.8, through 1.1 and 3.x. */
typedef struct {
    unsigned int h[8];
    unsigned int Nl, Nh;
    unsigned int data[16];
    unsigned int num, md_len;
} SHA256_CTX;
int SHA256_Init(SHA256_CTX *c);
int SHA256_Update(SHA256_CTX *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, SHA256_CTX *c);
#else
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
#endif
#include <pthread.h>
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

typedef struct {
    const SHA256_CTX *base;
    const unsigned char *arena;
    job_t *jobs;
    Py_ssize_t lo, hi;
    unsigned char *leaves;   /* 32 bytes per job, from index 0 of the batch */
    Py_ssize_t first_bad;    /* hi when all match */
} hash_task_t;

static const char HEXDIGITS[] = "0123456789abcdef";

static void *hash_range(void *arg) {
    hash_task_t *t = (hash_task_t *)arg;
    unsigned char digest[32];
    char hex[64];
    t->first_bad = t->hi;
    for (Py_ssize_t i = t->lo; i < t->hi; i++) {
        const job_t *j = &t->jobs[i];
        if (t->first_bad < t->hi) {  /* past a bad entry: only the payload comparisons are still wanted */
            if (j->sec_data != NULL)
                t->jobs[i].differs = memcmp(j->pri_data, j->sec_data, j->cmp_bytes) != 0;
            continue;
        }
        SHA256_CTX c = *t->base;
        SHA256_Update(&c, t->arena + j->hdr_off, j->hdr_len);
        SHA256_Update(&c, j->payload, (size_t)j->payload_len);
        SHA256_Final(digest, &c);
        if (j->sec_data != NULL)
            t->jobs[i].differs = memcmp(j->pri_data, j->sec_data, j->cmp_bytes) != 0;
        for (int k = 0; k < 32; k++) {
            hex[2 * k] = HEXDIGITS[digest[k] >> 4];
            hex[2 * k + 1] = HEXDIGITS[digest[k] & 15];
        }
        if (memcmp(hex, j->expected, 64) != 0) {
            t->first_bad = i;
            continue;
        }
        if (t->leaves != NULL)
            memcpy(t->leaves + 32 * i, digest, 32);
    }
    return NULL;
}

/* Hash jobs [0, n) over `threads` threads; returns the first index that does not match (n when all do). */
static Py_ssize_t hash_jobs(const SHA256_CTX *base, const unsigned char *arena, job_t *jobs, Py_ssize_t n,
                            unsigned char *leaves, int threads) {
    if (threads > n / 256)
        threads = (int)(n / 256);  /* a thread for fewer entries costs more than it saves */
    if (threads < 1)
        threads = 1;
    hash_task_t tasks[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 0; k < threads; k++) {
        tasks[k].base = base;
        tasks[k].arena = arena;
        tasks[k].jobs = jobs;
        tasks[k].lo = n * k / threads;
        tasks[k].hi = n * (k + 1) / threads;
        tasks[k].leaves = leaves;
        started[k] = 0;
    }
    for (int k = 1; k < threads; k++)
        started[k] = pthread_create(&tids[k], NULL, hash_range, &tasks[k]) == 0;
    hash_range(&tasks[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            hash_range(&tasks[k]);  /* no thread to be had: do it here */
    }
    for (int k = 0; k < threads; k++)
        if (tasks[k].first_bad < tasks[k].hi)
            return tasks[k].first_bad;
    return n;
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
            if (agreeing) {  /* this entry's fields now; its payload, if left to the hashing threads, then */
                int eq = agree_deferred(e, secondary, i, j, &rows[i - pos]);
                if (eq < 0)
                    goto done;
                if (eq)
                    agree++;
                else
                    agreeing = 0;
            }
        }
        Py_ssize_t ready = i - pos, good;
        Py_BEGIN_ALLOW_THREADS
        good = hash_jobs(&base, arena.buf, jobs, ready, leaves ? leaves + 32 * (pos - lo) : NULL, threads);
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
    while (agreeing) {
        int eq = agree_at(items_in, secondary, agree);
        if (eq < 0)
            goto done;
        if (eq)
            agree++;
        else
            agreeing = 0;
    }
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
    for (Py_ssize_t i = t->lo; i < t->hi; i++) {
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

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(items, lo, chain, prev, first_seq, want_leaves, secondary, threads, prefix)"},
    {"pairs", pairs, METH_VARARGS, "pairs(level, threads=1): Merkle parents of consecutive 32-byte hash pairs"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chainscan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__chainscan(void) { return PyModule_Create(&module); }
