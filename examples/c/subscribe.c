/* Subscribe to one pair's books on the krakenfeed bus and print best bid and ask.
 *
 *   cc -O2 -o subscribe subscribe.c -lzmq          (or: make)
 *   ./subscribe <endpoint> [pair] [count]
 *   ./subscribe tcp://127.0.0.1:23456 BTC/USD 10
 *
 * Needs libzmq and its headers (Debian/Ubuntu: apt-get install libzmq3-dev).
 *
 * <endpoint> is the bus's JSON PUB socket: tcp://127.0.0.1:<[bus] json_port>, or
 * ipc://<run dir>/<namespace>.bus.json. `python -m ingest --check-config` prints the
 * port in effect. pair defaults to BTC/USD, count to 10 (0 = run until killed).
 *
 * Wire format (docs/events.md): one ZMQ frame per message, the topic, one space, then a
 * JSON envelope {"v","topic","epoch","seq","pub_ns","type","event"}. The bus writes
 * compact JSON; this file needs no JSON library, only a little scanning that also
 * tolerates whitespace. Prices and quantities are decimal strings and are printed as
 * they came (never through a double). epoch is a u64: compare it for equality only.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* Skip JSON whitespace. */
static const char *ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* The position just after `"key":` at or after `from`, or NULL. */
static const char *after_key(const char *from, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    for (const char *p = strstr(from, pat); p; p = strstr(p + 1, pat)) {
        const char *q = ws(p + strlen(pat));
        if (*q == ':') return ws(q + 1);
    }
    return NULL;
}

/* Copy the JSON string at p (which must start with a quote) into out; returns the
 * position after its closing quote, or NULL. Decimal strings have no escapes. */
static const char *string_at(const char *p, char *out, size_t cap) {
    if (*p != '"') return NULL;
    const char *end = strchr(p + 1, '"');
    if (!end || (size_t)(end - p - 1) >= cap) return NULL;
    memcpy(out, p + 1, (size_t)(end - p - 1));
    out[end - p - 1] = '\0';
    return end + 1;
}

/* The best level of side `key` ("bids" or "asks") of the event: [[price, qty], ...].
 * Returns 1 with price and qty filled, 0 for an empty side, -1 if malformed. */
static int best_level(const char *event, const char *key, char *price, char *qty,
                      size_t cap) {
    const char *p = after_key(event, key);
    if (!p || *p != '[') return -1;
    p = ws(p + 1);
    if (*p == ']') return 0;
    if (*p != '[') return -1;
    p = string_at(ws(p + 1), price, cap);
    if (!p) return -1;
    p = ws(p);
    if (*p != ',') return -1;
    return string_at(ws(p + 1), qty, cap) ? 1 : -1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <endpoint> [pair=BTC/USD] [count=10]\n", argv[0]);
        return 2;
    }
    const char *endpoint = argv[1];
    const char *pair = argc > 2 ? argv[2] : "BTC/USD";
    long count = argc > 3 ? strtol(argv[3], NULL, 10) : 10;

    /* "book.BTC/USD " with the trailing space: exactly this pair, never BTC/USDT. */
    char prefix[128];
    int plen = snprintf(prefix, sizeof prefix, "book.%s ", pair);
    if (plen < 0 || (size_t)plen >= sizeof prefix) {
        fprintf(stderr, "subscribe: pair name too long\n");
        return 2;
    }

    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    int linger = 0;
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, prefix, (size_t)plen);
    if (zmq_connect(sub, endpoint) != 0) {
        fprintf(stderr, "subscribe: cannot connect to %s: %s\n", endpoint,
                zmq_strerror(zmq_errno()));
        return 1;
    }
    fprintf(stderr, "subscribe: book.%s on %s\n", pair, endpoint);

    unsigned long long last_epoch = 0, last_seq = 0;
    int have_last = 0, rc = 0;
    long printed = 0;
    zmq_msg_t msg;
    while (count == 0 || printed < count) {
        zmq_msg_init(&msg);
        int n = zmq_msg_recv(&msg, sub, 0);
        if (n < 0) {
            if (zmq_errno() == EINTR) { zmq_msg_close(&msg); continue; }
            fprintf(stderr, "subscribe: receive failed: %s\n", zmq_strerror(zmq_errno()));
            zmq_msg_close(&msg);
            rc = 1;
            break;
        }
        /* A NUL-terminated copy, so the string functions above can be used. */
        char *text = malloc((size_t)n + 1);
        if (!text) { zmq_msg_close(&msg); rc = 1; break; }
        memcpy(text, zmq_msg_data(&msg), (size_t)n);
        text[n] = '\0';
        zmq_msg_close(&msg);

        const char *payload = strchr(text, ' ');
        const char *pe = payload ? after_key(payload, "epoch") : NULL;
        const char *ps = payload ? after_key(payload, "seq") : NULL;
        const char *event = payload ? after_key(payload, "event") : NULL;
        char bp[64], bq[64], ap[64], aq[64];
        int b = event ? best_level(event, "bids", bp, bq, sizeof bp) : -1;
        int a = event ? best_level(event, "asks", ap, aq, sizeof ap) : -1;
        if (!pe || !ps || b < 0 || a < 0) {
            fprintf(stderr, "subscribe: skipping a malformed message\n");
            free(text);
            continue;
        }
        unsigned long long epoch = strtoull(pe, NULL, 10), seq = strtoull(ps, NULL, 10);
        if (have_last && epoch != last_epoch)
            fprintf(stderr, "subscribe: the bus restarted (new epoch); seq starts again\n");
        else if (have_last && seq != last_seq + 1)
            fprintf(stderr, "subscribe: lost %llu message(s) (seq jump)\n", seq - last_seq - 1);
        last_epoch = epoch;
        last_seq = seq;
        have_last = 1;

        printf("%s  bid %s x %s  ask %s x %s  seq %llu\n", pair, b ? bp : "-", b ? bq : "-",
               a ? ap : "-", a ? aq : "-", seq);
        fflush(stdout);
        printed++;
        free(text);
    }
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return rc;
}
