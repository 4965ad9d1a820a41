/*
 * Calls every function of kvvm's C ABI with null, destroyed, made-up and out-of-range arguments
 * and checks the status codes and messages. Run under valgrind by scripts/c-tests.sh: it must
 * report no errors and no leaks.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvvm.h"

static int failures = 0;

#define EXPECT(call, want)                                                                     \
    do {                                                                                       \
        kvvm_status s_ = (call);                                                               \
        if (s_ != (kvvm_status)(want)) {                                                       \
            char m_[512];                                                                      \
            kvvm_last_error(m_, sizeof m_);                                                    \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s (%s)\n", __FILE__, __LINE__,   \
                    #call, kvvm_status_name(s_), kvvm_status_name(want), m_);                  \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

#define TRUE(cond)                                                                             \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: %s is false\n", __FILE__, __LINE__, #cond);                \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

/* The last error message contains `needle`. */
static int last_error_has(const char *needle) {
    char m[512];
    size_t n = kvvm_last_error(m, sizeof m);
    return n > 0 && strstr(m, needle) != NULL;
}

/* Every call taking a cache handle, with that handle, must return `want`. */
static void cache_calls(kvvm_cache c, kvvm_status want) {
    uint32_t slot;
    uint64_t u;
    kvvm_view view;
    kvvm_range range;
    size_t count;
    uint8_t buf[16];
    kvvm_stats st = {.struct_size = sizeof st};
    kvvm_slot_tokens batch[1] = {{0, 0, 1}};
    kvvm_dl_managed_tensor_versioned *t = NULL;
    kvvm_dl_managed_tensor *lt = NULL;
    kvvm_swap sw = {0};
    EXPECT(kvvm_cache_alloc_slot(c, &slot), want);
    EXPECT(kvvm_cache_alloc_slot_for(c, 10, &slot), want);
    EXPECT(kvvm_cache_free_slot(c, 0), want);
    EXPECT(kvvm_cache_ensure(c, 0, 1), want);
    EXPECT(kvvm_cache_step(c, batch, 1), want);
    EXPECT(kvvm_cache_shrink(c, 0, 0), want);
    EXPECT(kvvm_cache_tokens(c, 0, &u), want);
    EXPECT(kvvm_cache_capacity(c, 0, &u), want);
    EXPECT(kvvm_cache_layer_view(c, 0, KVVM_K, &view), want);
    EXPECT(kvvm_cache_slot_ranges(c, 0, 0, &range, 1, &count), want);
    EXPECT(kvvm_cache_row(c, 0, 0, 0, KVVM_K, &range), want);
    EXPECT(kvvm_cache_read_row(c, 0, 0, 0, KVVM_K, buf, sizeof buf), want);
    EXPECT(kvvm_cache_write_row(c, 0, 0, 0, KVVM_K, buf, sizeof buf), want);
    EXPECT(kvvm_cache_stats(c, &st), want);
    EXPECT(kvvm_cache_quiesce(c), want);
    EXPECT(kvvm_cache_export_dlpack(c, 0, KVVM_K, KVVM_ALL_SLOTS, 0, &t), want);
    EXPECT(kvvm_cache_export_dlpack_legacy(c, 0, KVVM_K, KVVM_ALL_SLOTS, 0, &lt), want);
    EXPECT(kvvm_swap_create(c, NULL, &sw), want);
    EXPECT(kvvm_cache_destroy(c), want);
    TRUE(t == NULL && lt == NULL && sw.id == 0);
}

static void swap_calls(kvvm_swap s, kvvm_status want) {
    kvvm_ticket t = {0};
    uint64_t u;
    kvvm_swap_stats st = {.struct_size = sizeof st};
    EXPECT(kvvm_swap_out(s, 0, &t), want);
    EXPECT(kvvm_swap_in(s, 1, 0, &t), want);
    EXPECT(kvvm_swap_release(s, 1), want);
    EXPECT(kvvm_swap_pin(s, 1, 1), want);
    EXPECT(kvvm_swap_set_priority(s, 1, 3), want);
    EXPECT(kvvm_swap_host_tokens(s, 1, &u), want);
    EXPECT(kvvm_swap_get_stats(s, &st), want);
    EXPECT(kvvm_swap_quiesce(s), want);
    EXPECT(kvvm_swap_destroy(s), want);
    TRUE(t.id == 0);
}

static void ticket_calls(kvvm_ticket t, kvvm_status want) {
    uint32_t done;
    uint64_t u;
    EXPECT(kvvm_ticket_poll(t, &done), want);
    EXPECT(kvvm_ticket_wait(t), want);
    EXPECT(kvvm_ticket_event(t, &u), want);
    EXPECT(kvvm_ticket_copy(t, &u), want);
    EXPECT(kvvm_ticket_bytes(t, &u), want);
    EXPECT(kvvm_ticket_free(t), want);
}

static kvvm_config small_config(void) {
    kvvm_config cfg;
    EXPECT(kvvm_config_init(&cfg), KVVM_OK);
    cfg.layers = 2;
    cfg.kv_heads = 2;
    cfg.head_dim = 64;
    cfg.max_slots = 2;
    cfg.max_tokens = 256;
    cfg.budget_bytes = 1u << 20;
    cfg.backend = KVVM_BACKEND_HOST;
    cfg.host_granularity = 64u << 10;
    cfg.lookahead_steps = 0;
    return cfg;
}

int main(void) {
    /* Version and status names. */
    char want_version[32];
    snprintf(want_version, sizeof want_version, "%d.%d.%d", KVVM_VERSION_MAJOR, KVVM_VERSION_MINOR,
             KVVM_VERSION_PATCH);
    TRUE(strcmp(kvvm_version(), want_version) == 0);
    TRUE(strcmp(kvvm_status_name(KVVM_OK), "KVVM_OK") == 0);
    TRUE(strcmp(kvvm_status_name(KVVM_INVALID_HANDLE), "KVVM_INVALID_HANDLE") == 0);
    TRUE(strcmp(kvvm_status_name(9999), "KVVM_UNKNOWN_STATUS") == 0);
    TRUE(kvvm_last_error(NULL, 0) == 0); /* nothing failed yet on this thread */

    /* Null pointers for config calls. */
    EXPECT(kvvm_config_init(NULL), KVVM_NULL_POINTER);
    kvvm_config cfg;
    EXPECT(kvvm_config_preset(NULL, 1, 1, 1, &cfg), KVVM_NULL_POINTER);
    EXPECT(kvvm_config_preset("llama-3-8b", 1, 1, 1, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_config_preset("no-such-model", 1, 1, 1, &cfg), KVVM_INVALID_CONFIG);
    TRUE(last_error_has("no-such-model"));
    EXPECT(kvvm_config_preset("llama-3-70b@tp3", 1, 1, 1, &cfg), KVVM_INVALID_CONFIG);
    EXPECT(kvvm_config_preset("llama-3-70b@tp4", 4, 128, 1u << 20, &cfg), KVVM_OK);
    TRUE(cfg.layers == 80 && cfg.kv_heads == 2 && cfg.head_dim == 128);
    TRUE(cfg.struct_size == sizeof(kvvm_config) && cfg.struct_size == KVVM_CONFIG_SIZE_V1);

    /* Last error: size query, truncation, NUL termination. */
    EXPECT(kvvm_config_init(NULL), KVVM_NULL_POINTER);
    size_t need = kvvm_last_error(NULL, 0);
    TRUE(need > 5);
    char small[5] = {'x', 'x', 'x', 'x', 'x'};
    TRUE(kvvm_last_error(small, sizeof small) == need);
    TRUE(small[4] == '\0' && strlen(small) == 4);

    /* Cache creation: null, bad struct sizes, bad codes, bad shapes. */
    kvvm_cache c = {0};
    EXPECT(kvvm_cache_create(NULL, &c), KVVM_NULL_POINTER);
    cfg = small_config();
    EXPECT(kvvm_cache_create(&cfg, NULL), KVVM_NULL_POINTER);
    cfg.struct_size = 16;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    TRUE(last_error_has("struct_size"));
    {
        /* A caller built against a newer, larger header: zero tail accepted, nonzero refused. */
        struct {
            kvvm_config base;
            uint64_t newer_field;
        } big;
        memset(&big, 0, sizeof big);
        big.base = small_config();
        big.base.struct_size = sizeof big;
        big.newer_field = 1;
        EXPECT(kvvm_cache_create(&big.base, &c), KVVM_INVALID_CONFIG);
        big.newer_field = 0;
        EXPECT(kvvm_cache_create(&big.base, &c), KVVM_OK);
        EXPECT(kvvm_cache_destroy(c), KVVM_OK);
        c.id = 0;
    }
    cfg = small_config();
    cfg.dtype = 77;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    cfg = small_config();
    cfg.layout = 5;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    cfg = small_config();
    cfg.backend = 9;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    cfg = small_config();
    cfg.layers = 0;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    cfg = small_config();
    cfg.budget_bytes = 1;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    cfg = small_config();
    cfg.page_size = 12345;
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_INVALID_CONFIG);
    TRUE(c.id == 0); /* not written on failure */

    /* Null and made-up handles. */
    kvvm_cache null_cache = {0}, garbage_cache = {0xdeadbeefcafeULL};
    cache_calls(null_cache, KVVM_INVALID_HANDLE);
    TRUE(last_error_has("handle"));
    cache_calls(garbage_cache, KVVM_INVALID_HANDLE);
    kvvm_swap null_swap = {0}, garbage_swap = {0x1234567ULL};
    swap_calls(null_swap, KVVM_INVALID_HANDLE);
    swap_calls(garbage_swap, KVVM_INVALID_HANDLE);
    kvvm_ticket null_ticket = {0}, garbage_ticket = {0xffffffffffffffffULL};
    ticket_calls(null_ticket, KVVM_INVALID_HANDLE);
    ticket_calls(garbage_ticket, KVVM_INVALID_HANDLE);

    /* A live cache: null out-pointers and out-of-range arguments. */
    cfg = small_config();
    EXPECT(kvvm_cache_create(&cfg, &c), KVVM_OK);
    TRUE(c.id != 0);
    uint32_t slot = 99;
    uint64_t u = 0;
    EXPECT(kvvm_cache_alloc_slot(c, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_alloc_slot_for(c, 5, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_tokens(c, 0, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_capacity(c, 0, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_layer_view(c, 0, KVVM_K, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_row(c, 0, 0, 0, KVVM_K, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_read_row(c, 0, 0, 0, KVVM_K, NULL, 256), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_write_row(c, 0, 0, 0, KVVM_K, NULL, 256), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_stats(c, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_step(c, NULL, 1), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_step(c, NULL, 0), KVVM_OK);
    EXPECT(kvvm_cache_export_dlpack(c, 0, KVVM_K, KVVM_ALL_SLOTS, 0, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_export_dlpack_legacy(c, 0, KVVM_K, KVVM_ALL_SLOTS, 0, NULL),
           KVVM_NULL_POINTER);
    EXPECT(kvvm_swap_create(c, NULL, NULL), KVVM_NULL_POINTER);

    EXPECT(kvvm_cache_alloc_slot(c, &slot), KVVM_OK);
    TRUE(slot < 2);
    EXPECT(kvvm_cache_free_slot(c, 7), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_free_slot(c, 1 - slot), KVVM_INVALID_ARGUMENT); /* not allocated */
    EXPECT(kvvm_cache_ensure(c, slot, 257), KVVM_INVALID_ARGUMENT);   /* > max_tokens */
    EXPECT(kvvm_cache_ensure(c, 7, 1), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_ensure(c, slot, 0xffffffffffffffffULL), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_ensure(c, slot, 40), KVVM_OK);
    EXPECT(kvvm_cache_tokens(c, slot, &u), KVVM_OK);
    TRUE(u == 40);
    EXPECT(kvvm_cache_shrink(c, 7, 1), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_shrink(c, slot, 41), KVVM_OK); /* never grows */
    EXPECT(kvvm_cache_tokens(c, slot, &u), KVVM_OK);
    TRUE(u == 40);
    EXPECT(kvvm_cache_tokens(c, 7, &u), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_capacity(c, 7, &u), KVVM_INVALID_ARGUMENT);
    kvvm_slot_tokens bad_batch[2] = {{slot, 0, 50}, {7, 0, 1}};
    EXPECT(kvvm_cache_step(c, bad_batch, 2), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_tokens(c, slot, &u), KVVM_OK);
    TRUE(u == 40); /* all or nothing */

    kvvm_view view;
    EXPECT(kvvm_cache_layer_view(c, 2, KVVM_K, &view), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_layer_view(c, 0, 2, &view), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_layer_view(c, 1, KVVM_V, &view), KVVM_OK);
    TRUE(view.ndim == 4 && view.shape[0] == 2 && view.shape[1] == 256 && view.shape[2] == 2 &&
         view.shape[3] == 64 && view.strides[3] == 1 && view.dtype == KVVM_DTYPE_F16 &&
         view.device_type == KVVM_DEVICE_CPU && view.itemsize == 2);

    kvvm_range ranges[4];
    size_t count = 0;
    EXPECT(kvvm_cache_slot_ranges(c, slot, 10, ranges, 4, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_cache_slot_ranges(c, slot, 10, ranges, 0, &count), KVVM_BUFFER_TOO_SMALL);
    TRUE(count == 1); /* interleaved: one range */
    EXPECT(kvvm_cache_slot_ranges(c, slot, 10, NULL, 0, &count), KVVM_BUFFER_TOO_SMALL);
    EXPECT(kvvm_cache_slot_ranges(c, 9, 10, ranges, 4, &count), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_slot_ranges(c, slot, 257, ranges, 4, &count), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_slot_ranges(c, slot, 10, ranges, 4, &count), KVVM_OK);
    TRUE(count == 1 && ranges[0].len == 10 * 2 * 2 * 2 * 64 * 2);

    kvvm_range row;
    uint64_t cap = 0;
    EXPECT(kvvm_cache_capacity(c, slot, &cap), KVVM_OK);
    EXPECT(kvvm_cache_row(c, slot, cap, 0, KVVM_K, &row), KVVM_INVALID_ARGUMENT); /* unmapped */
    EXPECT(kvvm_cache_row(c, slot, 0, 2, KVVM_K, &row), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_row(c, slot, 0, 0, 3, &row), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_row(c, slot, 39, 1, KVVM_V, &row), KVVM_OK);
    TRUE(row.len == 256);
    uint8_t out[256], in[256];
    for (int i = 0; i < 256; i++) in[i] = (uint8_t)(i * 3 + 1);
    EXPECT(kvvm_cache_write_row(c, slot, 39, 1, KVVM_V, in, 255), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_write_row(c, slot, 39, 1, KVVM_V, in, 256), KVVM_OK);
    EXPECT(kvvm_cache_read_row(c, slot, 39, 1, KVVM_V, out, 256), KVVM_OK);
    TRUE(memcmp(in, out, 256) == 0);
    TRUE(memcmp((void *)(uintptr_t)row.addr, in, 256) == 0); /* the row address is the view */

    kvvm_stats st = {.struct_size = 8};
    EXPECT(kvvm_cache_stats(c, &st), KVVM_INVALID_ARGUMENT);
    st.struct_size = sizeof st;
    EXPECT(kvvm_cache_stats(c, &st), KVVM_OK);
    TRUE(st.allocated_slots == 1 && st.live_bytes == 40u * 2 * 2 * 2 * 64 * 2);

    /* DLPack: out-of-range exports; a tensor outliving the cache handle. */
    kvvm_dl_managed_tensor_versioned *t = NULL;
    EXPECT(kvvm_cache_export_dlpack(c, 2, KVVM_K, KVVM_ALL_SLOTS, 0, &t), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_export_dlpack(c, 0, 2, KVVM_ALL_SLOTS, 0, &t), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_export_dlpack(c, 0, KVVM_K, 5, 1, &t), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_export_dlpack(c, 0, KVVM_K, slot, cap + 1, &t), KVVM_INVALID_ARGUMENT);
    TRUE(t == NULL);
    EXPECT(kvvm_cache_export_dlpack(c, 1, KVVM_V, slot, 40, &t), KVVM_OK);
    TRUE(t != NULL && t->version.major == 1 && t->dl_tensor.ndim == 3 &&
         t->dl_tensor.shape[0] == 40 && t->dl_tensor.shape[1] == 2 && t->dl_tensor.shape[2] == 64 &&
         t->dl_tensor.strides[2] == 1 && t->dl_tensor.dtype.code == 2 &&
         t->dl_tensor.dtype.bits == 16 && t->dl_tensor.device.device_type == 1 &&
         t->deleter != NULL);
    kvvm_dl_managed_tensor *lt = NULL;
    EXPECT(kvvm_cache_export_dlpack_legacy(c, 0, KVVM_K, KVVM_ALL_SLOTS, 0, &lt), KVVM_OK);
    TRUE(lt != NULL && lt->dl_tensor.ndim == 4 && lt->dl_tensor.shape[1] == 256);

    /* The swap engine and its tickets: null pointers, bad ids, a destroyed engine. */
    kvvm_swap_config scfg;
    EXPECT(kvvm_swap_config_init(NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_swap_config_init(&scfg), KVVM_OK);
    scfg.host_budget_bytes = 4u << 20;
    kvvm_swap sw = {0};
    scfg.struct_size = 4;
    EXPECT(kvvm_swap_create(c, &scfg, &sw), KVVM_INVALID_CONFIG);
    scfg.struct_size = sizeof scfg;
    scfg.max_in_flight = 0;
    EXPECT(kvvm_swap_create(c, &scfg, &sw), KVVM_INVALID_CONFIG);
    scfg.max_in_flight = 4;
    EXPECT(kvvm_swap_create(c, &scfg, &sw), KVVM_OK);
    kvvm_ticket tk = {0};
    EXPECT(kvvm_swap_out(sw, slot, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_swap_out(sw, 1 - slot, &tk), KVVM_INVALID_ARGUMENT); /* not allocated */
    EXPECT(kvvm_swap_out(sw, 77, &tk), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_swap_in(sw, 12345, 1 - slot, &tk), KVVM_INVALID_ARGUMENT); /* unknown copy */
    EXPECT(kvvm_swap_release(sw, 12345), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_swap_pin(sw, 12345, 1), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_swap_set_priority(sw, 12345, 1), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_swap_host_tokens(sw, 12345, &u), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_swap_host_tokens(sw, 12345, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_swap_get_stats(sw, NULL), KVVM_NULL_POINTER);
    TRUE(tk.id == 0);

    EXPECT(kvvm_swap_out(sw, slot, &tk), KVVM_OK);
    uint64_t copy = 0, ev = 1;
    EXPECT(kvvm_ticket_copy(tk, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_ticket_poll(tk, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_ticket_event(tk, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_ticket_bytes(tk, NULL), KVVM_NULL_POINTER);
    EXPECT(kvvm_ticket_copy(tk, &copy), KVVM_OK);
    EXPECT(kvvm_ticket_wait(tk), KVVM_OK);
    EXPECT(kvvm_ticket_event(tk, &ev), KVVM_OK);
    TRUE(ev == 0); /* host backend: no event */
    EXPECT(kvvm_swap_set_priority(sw, copy, 256), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_swap_set_priority(sw, copy, 255), KVVM_OK);
    EXPECT(kvvm_swap_pin(sw, copy, 1), KVVM_OK);
    EXPECT(kvvm_swap_host_tokens(sw, copy, &u), KVVM_OK);
    TRUE(u == 40);
    EXPECT(kvvm_ticket_free(tk), KVVM_OK);
    ticket_calls(tk, KVVM_INVALID_HANDLE); /* freed ticket */
    TRUE(last_error_has("not valid"));
    /* Handles of one kind are not accepted as another. */
    kvvm_cache as_cache = {sw.id};
    EXPECT(kvvm_cache_quiesce(as_cache), KVVM_INVALID_HANDLE);
    kvvm_ticket as_ticket = {c.id};
    EXPECT(kvvm_ticket_wait(as_ticket), KVVM_INVALID_HANDLE);

    /* Swap back into a slot that is allocated but not empty: refused, nothing changes. */
    uint32_t s2;
    EXPECT(kvvm_cache_alloc_slot(c, &s2), KVVM_OK);
    EXPECT(kvvm_cache_ensure(c, s2, 3), KVVM_OK);
    EXPECT(kvvm_swap_in(sw, copy, s2, &tk), KVVM_INVALID_ARGUMENT);
    EXPECT(kvvm_cache_shrink(c, s2, 0), KVVM_OK);
    EXPECT(kvvm_swap_in(sw, copy, s2, &tk), KVVM_OK);
    EXPECT(kvvm_ticket_wait(tk), KVVM_OK);
    EXPECT(kvvm_ticket_free(tk), KVVM_OK);
    EXPECT(kvvm_cache_read_row(c, s2, 39, 1, KVVM_V, out, 256), KVVM_OK);
    TRUE(memcmp(in, out, 256) == 0); /* the row survived the round trip */
    EXPECT(kvvm_swap_release(sw, copy), KVVM_OK);
    EXPECT(kvvm_swap_release(sw, copy), KVVM_INVALID_ARGUMENT);
    kvvm_swap_stats sst = {.struct_size = 8};
    EXPECT(kvvm_swap_get_stats(sw, &sst), KVVM_INVALID_ARGUMENT);
    sst.struct_size = sizeof sst;
    EXPECT(kvvm_swap_get_stats(sw, &sst), KVVM_OK);
    TRUE(sst.transfers == 2 && sst.bytes_out > 0 && sst.bytes_in == sst.bytes_out);
    EXPECT(kvvm_swap_destroy(sw), KVVM_OK);
    swap_calls(sw, KVVM_INVALID_HANDLE); /* destroyed engine */

    /* Destroy the cache while the tensors are alive: they stay valid. */
    uint8_t before[256];
    EXPECT(kvvm_cache_read_row(c, s2, 39, 0, KVVM_K, before, 256), KVVM_OK);
    EXPECT(kvvm_cache_destroy(c), KVVM_OK);
    cache_calls(c, KVVM_INVALID_HANDLE); /* destroyed cache */
    TRUE(last_error_has("not valid"));
    {
        /* The batch tensor (layer 0 K) still addresses slot s2, which is allocated and mapped. */
        const int64_t *str = lt->dl_tensor.strides;
        const uint16_t *base = (const uint16_t *)lt->dl_tensor.data;
        TRUE(memcmp(base + s2 * str[0] + 39 * str[1], before, 256) == 0);
    }
    kvvm_dlpack_free(t);
    kvvm_dlpack_free(NULL);
    kvvm_dlpack_free_legacy(lt);
    kvvm_dlpack_free_legacy(NULL);

    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("error paths: ok\n");
    return 0;
}
