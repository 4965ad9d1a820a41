/*
 * A small decode loop over kvvm's C ABI: create a cache for a (shrunk) Llama-3-8B shape on the
 * host backend, admit two requests, grow them step by step while writing each new token's K and
 * V through the layer views, read them back through the library, swap one request out to host
 * memory and back into another slot, check its KV survived, and clean up.
 *
 * Build (see scripts/c-tests.sh):
 *   cc -Wall -Werror -Iinclude examples/c/decode_loop.c -Ltarget/debug -lkvvm -o decode_loop
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvvm.h"

#define CHECK(call)                                                                            \
    do {                                                                                       \
        kvvm_status s_ = (call);                                                               \
        if (s_ != KVVM_OK) {                                                                   \
            char msg_[512];                                                                    \
            kvvm_last_error(msg_, sizeof msg_);                                                \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,           \
                    kvvm_status_name(s_), msg_);                                               \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

enum { LAYERS = 2, SLOTS = 4, MAX_TOKENS = 1024, PREFILL_A = 100, PREFILL_B = 37, STEPS = 50 };

/* The f16 bit pattern stored for element e of (request, token, layer, kv): arbitrary but
 * unique enough that a misplaced or lost row is noticed. */
static uint16_t stamp(uint32_t req, uint64_t token, uint32_t layer, uint32_t kv, size_t e) {
    return (uint16_t)(req * 7919u + token * 131u + layer * 17u + kv * 5u + e);
}

/* Writes token `token` of `slot` (request `req`) in every layer's K and V through the views. */
static void write_token(kvvm_cache cache, uint32_t slot, uint32_t req, uint64_t token) {
    for (uint32_t layer = 0; layer < LAYERS; layer++) {
        for (uint32_t kv = KVVM_K; kv <= KVVM_V; kv++) {
            kvvm_view v;
            CHECK(kvvm_cache_layer_view(cache, layer, kv, &v));
            uint16_t *base = (uint16_t *)v.data;
            uint16_t *row = base + slot * v.strides[0] + token * v.strides[1];
            size_t n = (size_t)(v.shape[2] * v.shape[3]); /* heads are contiguous: stride[2] = head_dim */
            for (size_t e = 0; e < n; e++) row[e] = stamp(req, token, layer, kv, e);
        }
    }
}

/* Reads tokens [0, tokens) of `slot` back through kvvm_cache_read_row and compares. */
static int check_tokens(kvvm_cache cache, uint32_t slot, uint32_t req, uint64_t tokens) {
    kvvm_range r;
    CHECK(kvvm_cache_row(cache, slot, 0, 0, KVVM_K, &r));
    uint16_t *buf = malloc(r.len);
    int bad = 0;
    for (uint64_t t = 0; t < tokens && !bad; t++) {
        for (uint32_t layer = 0; layer < LAYERS; layer++) {
            for (uint32_t kv = KVVM_K; kv <= KVVM_V; kv++) {
                CHECK(kvvm_cache_read_row(cache, slot, t, layer, kv, (uint8_t *)buf, r.len));
                for (size_t e = 0; e < r.len / 2; e++) {
                    if (buf[e] != stamp(req, t, layer, kv, e)) {
                        fprintf(stderr, "slot %u token %" PRIu64 " layer %u kv %u: mismatch\n", slot,
                                t, layer, kv);
                        bad = 1;
                        break;
                    }
                }
            }
        }
    }
    free(buf);
    return bad;
}

int main(void) {
    printf("kvvm %s (header %d.%d.%d)\n", kvvm_version(), KVVM_VERSION_MAJOR, KVVM_VERSION_MINOR,
           KVVM_VERSION_PATCH);

    kvvm_config cfg;
    CHECK(kvvm_config_preset("llama-3-8b", SLOTS, MAX_TOKENS, 64u << 20, &cfg));
    cfg.layers = LAYERS; /* keep the example small */
    cfg.backend = KVVM_BACKEND_HOST;
    cfg.host_granularity = 64u << 10;
    kvvm_cache cache;
    CHECK(kvvm_cache_create(&cfg, &cache));

    /* Admit two requests and prefill their prompts. */
    uint32_t a, b;
    CHECK(kvvm_cache_alloc_slot(cache, &a));
    CHECK(kvvm_cache_alloc_slot(cache, &b));
    CHECK(kvvm_cache_ensure(cache, a, PREFILL_A));
    CHECK(kvvm_cache_ensure(cache, b, PREFILL_B));
    for (uint64_t t = 0; t < PREFILL_A; t++) write_token(cache, a, 1, t);
    for (uint64_t t = 0; t < PREFILL_B; t++) write_token(cache, b, 2, t);

    /* Decode: one token per request per step. */
    uint64_t la = PREFILL_A, lb = PREFILL_B;
    for (int step = 0; step < STEPS; step++) {
        kvvm_slot_tokens batch[2] = {{a, 0, la + 1}, {b, 0, lb + 1}};
        CHECK(kvvm_cache_step(cache, batch, 2));
        write_token(cache, a, 1, la++);
        write_token(cache, b, 2, lb++);
    }
    if (check_tokens(cache, a, 1, la) || check_tokens(cache, b, 2, lb)) return 1;

    kvvm_stats st = {.struct_size = sizeof st};
    CHECK(kvvm_cache_stats(cache, &st));
    printf("after %d steps: %u slots, %" PRIu64 " live bytes, %" PRIu64 " mapped bytes, %" PRIu64
           " backend calls\n",
           STEPS, st.allocated_slots, st.live_bytes, st.mapped_bytes, st.backend_calls);

    /* Preempt request b: swap it out, then resume it in whatever slot is free. */
    kvvm_swap_config scfg;
    CHECK(kvvm_swap_config_init(&scfg));
    scfg.host_budget_bytes = 64u << 20;
    kvvm_swap swap;
    CHECK(kvvm_swap_create(cache, &scfg, &swap));
    kvvm_ticket t;
    CHECK(kvvm_swap_out(swap, b, &t));
    uint64_t copy, bytes;
    CHECK(kvvm_ticket_copy(t, &copy));
    CHECK(kvvm_ticket_bytes(t, &bytes));
    CHECK(kvvm_ticket_wait(t));
    CHECK(kvvm_ticket_free(t));
    uint64_t host_tokens;
    CHECK(kvvm_swap_host_tokens(swap, copy, &host_tokens));
    printf("swapped out request b: %" PRIu64 " tokens, %" PRIu64 " bytes\n", host_tokens, bytes);

    uint32_t b2;
    CHECK(kvvm_cache_alloc_slot_for(cache, lb, &b2));
    CHECK(kvvm_swap_in(swap, copy, b2, &t));
    uint32_t done = 0;
    while (!done) CHECK(kvvm_ticket_poll(t, &done));
    CHECK(kvvm_ticket_free(t));
    if (check_tokens(cache, b2, 2, lb)) return 1;
    printf("swapped request b back into slot %u: %" PRIu64 " tokens intact\n", b2, lb);

    CHECK(kvvm_swap_release(swap, copy));
    CHECK(kvvm_swap_destroy(swap));
    CHECK(kvvm_cache_free_slot(cache, a));
    CHECK(kvvm_cache_free_slot(cache, b2));
    CHECK(kvvm_cache_destroy(cache));
    printf("ok\n");
    return 0;
}
