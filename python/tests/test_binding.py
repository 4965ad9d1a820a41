"""The binding's Python surface: range-checked integers, status codes, dtypes, dataclasses, slot
ranges, multi-layer export, swap helpers, handle lifecycle, packaging and lazy loading."""

import dataclasses
import gc
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import kvvm
from kvvm import _lib

ROOT = Path(__file__).resolve().parents[2]


def make_cache(**kw):
    args = dict(layers=3, kv_heads=2, head_dim=32, max_slots=6, max_tokens=512,
                budget_bytes=8 << 20, backend="host", host_granularity=64 << 10, dtype="f32",
                lookahead_steps=0)
    args.update(kw)
    return kvvm.Cache(**args)


# ---- integers never wrap


def test_out_of_range_slots_and_tokens_are_refused_before_c():
    with make_cache() as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.ensure(a, 10)
        with pytest.raises(OverflowError, match="slot"):
            cache.free_slot(2**32 + b)  # ctypes would have freed slot b
        assert cache.tokens(b) == 0 and cache.stats().allocated_slots == 2
        with pytest.raises(OverflowError, match="tokens"):
            cache.ensure(a, 2**64 + 30)  # ctypes would have ensured 30 tokens
        with pytest.raises(OverflowError, match="tokens"):
            cache.ensure(a, -1)
        with pytest.raises(OverflowError):
            cache.shrink(a, 2**64 + 1)
        with pytest.raises(OverflowError):
            cache.step({a: 2**64 + 12})
        with pytest.raises(OverflowError):
            cache.step([(-1, 3)])
        with pytest.raises(OverflowError):
            cache.tokens(-1)
        with pytest.raises(OverflowError, match="layer"):
            cache.layer_view(2**32, "k")
        with pytest.raises(OverflowError, match="token"):
            cache.row(a, 2**64, 0, "k")
        with pytest.raises(OverflowError):
            cache.alloc_slot(tokens=2**64)
        assert cache.tokens(a) == 10
        # bools are not integers here, nor K/V
        for call in (lambda: cache.free_slot(True), lambda: cache.ensure(a, True),
                     lambda: cache.view(0, True, slot=a), lambda: cache.layer_view(False, "k"),
                     lambda: cache.read_row(a, 0, 0, False)):
            with pytest.raises(TypeError, match="bool"):
                call()
        with pytest.raises(TypeError):
            cache.ensure(a, 10.0)
        with pytest.raises(ValueError, match="'k' or 'v'"):
            cache.layer_view(0, "q")
        # integer-like objects are accepted
        cache.ensure(np.uint32(a), np.int64(12))
        assert cache.tokens(a) == 12


def test_out_of_range_config_is_refused_before_c():
    with pytest.raises(OverflowError, match="budget_bytes"):
        make_cache(budget_bytes=2**64 + (1 << 20))  # ctypes would have made a 1 MiB cache
    with pytest.raises(OverflowError, match="layers"):
        make_cache(layers=-1)  # ctypes would have asked for 2**32 - 1 layers
    for name, value in (("max_slots", 2**32), ("max_tokens", -5), ("kv_heads", 2**32 + 2),
                        ("head_dim", -32), ("page_size", 2**64), ("host_granularity", -1),
                        ("device", 2**31), ("lookahead_steps", -1), ("copy_threads", 2**32)):
        with pytest.raises(OverflowError, match=name):
            make_cache(**{name: value})
    with pytest.raises(TypeError, match="bool"):
        make_cache(max_slots=True)
    with pytest.raises(TypeError):
        make_cache(layout=1.5)
    with pytest.raises(OverflowError, match="max_tokens"):
        kvvm.Cache(model="llama-3-8b", max_slots=1, max_tokens=2**64 + 1, budget_bytes=1 << 20)
    with make_cache() as cache:
        with pytest.raises(OverflowError, match="host_budget_bytes"):
            kvvm.SwapEngine(cache, host_budget_bytes=2**64 + (1 << 20))
        with pytest.raises(OverflowError, match="max_in_flight"):
            kvvm.SwapEngine(cache, max_in_flight=-1)
        with kvvm.SwapEngine(cache) as swap:
            with pytest.raises(OverflowError, match="copy"):
                swap.release(2**64 + 1)
            with pytest.raises(OverflowError, match="priority"):
                swap.set_priority(1, 2**32 + 1)
            with pytest.raises(TypeError, match="bool"):
                swap.swap_out(False)


# ---- status codes, dtypes, dataclasses


def test_status_enum_matches_the_library():
    for status in kvvm.Status:
        assert kvvm.library.kvvm_status_name(status).decode() == f"KVVM_STATUS_{status.name}"
    with make_cache() as cache:
        with pytest.raises(kvvm.InvalidArgumentError) as e:
            cache.ensure(cache.alloc_slot(), 10**6)
    assert e.value.status is kvvm.Status.INVALID_ARGUMENT and e.value.status == 3
    assert e.value.status_name == "KVVM_STATUS_INVALID_ARGUMENT"


def test_dtypes_by_name_numpy_and_torch():
    cases = [("bfloat16", "bf16", None), (np.float16, "f16", np.float16),
             (np.dtype("float32"), "f32", np.float32), ("F16", "f16", np.float16)]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        cases += [(torch.float16, "f16", np.float16), (torch.bfloat16, "bf16", None),
                  (torch.float32, "f32", np.float32)]
    for dtype, name, np_dtype in cases:
        with make_cache(dtype=dtype) as cache:
            assert cache.dtype == name
            assert cache.layer_view(0, "k").dtype == name
            s = cache.alloc_slot()
            cache.ensure(s, 3)
            if np_dtype is not None:
                assert np.from_dlpack(cache.view(0, "v", slot=s)).dtype == np_dtype
            if torch is not None:
                assert str(torch.from_dlpack(cache.view(0, "v", slot=s)).dtype) == \
                    {"f16": "torch.float16", "bf16": "torch.bfloat16", "f32": "torch.float32"}[name]
    with pytest.raises(kvvm.InvalidConfigError, match="unknown dtype"):
        make_cache(dtype="int8")
    with pytest.raises(kvvm.InvalidConfigError, match="unknown dtype"):
        make_cache(dtype=np.int32)
    with pytest.raises(TypeError, match="dtype"):
        make_cache(dtype=object())


def test_stats_and_views_are_frozen_dataclasses_matching_the_structs():
    with make_cache() as cache, kvvm.SwapEngine(cache) as swap:
        s = cache.alloc_slot()
        cache.ensure(s, 5)
        for obj, struct in ((cache.stats(), _lib.Stats), (swap.stats(), _lib.SwapStats)):
            names = [f.name for f in dataclasses.fields(obj)]
            assert names == [n for n, _ in struct._fields_ if n not in ("struct_size", "reserved")]
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(obj, names[0], 0)
        assert cache.stats().live_bytes == 5 * 3 * 2 * 2 * 32 * 4
        lv = cache.layer_view(1, "v")
        assert lv.shape == (6, 512, 2, 32) and lv.dtype == "f32" and lv.itemsize == 4
        with pytest.raises(dataclasses.FrozenInstanceError):
            lv.data = 0
        v = cache.view(1, "v", slot=s)
        assert (v.layer, v.kv, v.slot, v.tokens, v.dtype) == (1, 1, s, 5, "f32")
        with pytest.raises(dataclasses.FrozenInstanceError):
            v.tokens = 100


def test_from_hf_config():
    cfg = types.SimpleNamespace(num_hidden_layers=5, num_attention_heads=8,
                                num_key_value_heads=2, hidden_size=256,
                                max_position_embeddings=128, torch_dtype="bfloat16")
    with kvvm.Cache.from_hf_config(cfg, max_slots=2, budget_bytes=8 << 20, backend="host",
                                   host_granularity=64 << 10) as c:
        assert (c.layers, c.kv_heads, c.head_dim, c.max_tokens, c.dtype) == (5, 2, 32, 128, "bf16")
    cfg.num_key_value_heads, cfg.head_dim = None, 16  # MHA, explicit head_dim
    with kvvm.Cache.from_hf_config(cfg, max_slots=2, max_tokens=64, budget_bytes=8 << 20,
                                   dtype="f32", backend="host", host_granularity=64 << 10) as c:
        assert (c.layers, c.kv_heads, c.head_dim, c.max_tokens, c.dtype) == (5, 8, 16, 64, "f32")
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                     num_hidden_layers=4, max_position_embeddings=64)
    with kvvm.Cache.from_hf_config(llama, max_slots=1, budget_bytes=8 << 20, dtype="f16",
                                   backend="host", host_granularity=64 << 10) as c:
        assert (c.layers, c.kv_heads, c.head_dim, c.max_tokens) == (4, 3, 16, 64)


# ---- slot ranges, multi-layer export, swap helpers


def test_alloc_slots_gives_adjacent_slots_and_a_zero_copy_batch_slice():
    with make_cache(max_slots=6) as cache:
        held = [cache.alloc_slot() for _ in range(6)]
        for s in (1, 3, 4):
            cache.free_slot(s)
        run = cache.alloc_slots(2)
        assert run == range(3, 5)
        assert cache.stats().allocated_slots == 5  # slot 1 was taken and given back
        with pytest.raises(kvvm.SlotsExhaustedError, match="2 adjacent"):
            cache.alloc_slots(2)  # only slot 1 is free
        assert cache.stats().allocated_slots == 5
        cache.step({s: 20 for s in run})
        batch = np.from_dlpack(cache.view(0, "k"))[run.start:run.stop, :20]
        assert batch.shape == (2, 20, 2, 32)
        for i, s in enumerate(run):
            one = np.from_dlpack(cache.view(0, "k", slot=s))
            one[:] = s + np.arange(20, dtype=np.float32)[:, None, None]
            assert batch[i].ctypes.data == one.ctypes.data  # the same memory
            np.testing.assert_array_equal(batch[i], one)
        with pytest.raises(ValueError):
            cache.alloc_slots(0)
        del held


def test_kv_views_and_tensors_of_every_layer_in_one_call():
    with make_cache() as cache:
        s = cache.alloc_slot()
        cache.ensure(s, 7)
        for layer in range(3):
            for kv in "kv":
                np.from_dlpack(cache.view(layer, kv, slot=s))[:] = layer * 10 + (kv == "v")
        views = cache.kv_views(slot=s)
        assert len(views) == 3 and all(k.kv == 0 and v.kv == 1 for k, v in views)
        arrays = cache.kv_tensors(np.from_dlpack, slot=s)
        for layer, (k, v) in enumerate(arrays):
            assert k.shape == v.shape == (7, 2, 32)
            assert (k == layer * 10).all() and (v == layer * 10 + 1).all()
        whole = cache.kv_tensors(np.from_dlpack)
        assert whole[2][1].shape == (6, 512, 2, 32)
        assert (whole[2][1][s, :7] == 21).all()


def test_evict_and_restore():
    with make_cache(budget_bytes=768 << 10) as cache, \
            kvvm.SwapEngine(cache, host_budget_bytes=8 << 20) as swap:
        s = cache.alloc_slot()
        cache.ensure(s, 40)
        np.from_dlpack(cache.view(2, "k", slot=s))[:] = 4.5
        copy = swap.evict(s)
        assert swap.host_tokens(copy) == 40 and cache.stats().allocated_slots == 0
        with pytest.raises(kvvm.InvalidArgumentError):
            cache.tokens(s)  # freed by the swap-out
        s2 = swap.restore(copy)  # allocates and sizes a slot
        assert cache.tokens(s2) == 40
        assert (np.from_dlpack(cache.view(2, "k", slot=s2)) == 4.5).all()
        # the copy is kept: a second swap-out of the slot reuses it
        assert swap.evict(s2) == copy
        # a restore that cannot get pages frees the slot it allocated and keeps the copy
        hog = cache.alloc_slot()
        cache.ensure(hog, 512)  # takes the whole page budget (12 pages)
        with pytest.raises(kvvm.BudgetExhaustedError):
            swap.restore(copy)
        assert cache.stats().allocated_slots == 1
        cache.free_slot(hog)
        s3 = swap.restore(copy, release=True)
        assert (np.from_dlpack(cache.view(2, "k", slot=s3)) == 4.5).all()
        with pytest.raises(kvvm.InvalidArgumentError):
            swap.release(copy)  # released by restore


# ---- lifecycle


def test_handles_close_once_and_on_garbage_collection():
    cache = make_cache()
    h = cache._handle
    assert not cache.closed
    cache.close()
    cache.close()  # idempotent
    assert cache.closed
    with pytest.raises(kvvm.InvalidHandleError, match="closed"):
        cache.alloc_slot()
    # __del__ destroys the handle: the library no longer knows it
    cache = make_cache()
    swap = kvvm.SwapEngine(cache)
    hc, hs = cache._handle, swap._handle
    del swap, cache
    gc.collect()
    lib = kvvm.library
    assert lib.kvvm_cache_free(hc) == kvvm.Status.INVALID_HANDLE
    assert lib.kvvm_swap_free(hs) == kvvm.Status.INVALID_HANDLE
    assert lib.kvvm_cache_free(h) == kvvm.Status.INVALID_HANDLE
    with make_cache() as cache, kvvm.SwapEngine(cache) as swap:
        s = cache.alloc_slot()
        cache.ensure(s, 4)
        with swap.swap_out(s) as t:
            t.wait()
        assert t.closed
        with pytest.raises(kvvm.InvalidHandleError, match="ticket is closed"):
            t.poll()
    assert swap.closed and cache.closed


# ---- packaging


def _cargo_version():
    text = (ROOT / "Cargo.toml").read_text()
    return re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', text, re.M | re.S)[1]


def test_versions_agree():
    assert kvvm.__version__ == kvvm.version() == _cargo_version()
    assert (Path(kvvm.__file__).parent / "py.typed").is_file()


def test_import_is_lazy_and_the_missing_library_is_explained():
    code = ("import kvvm, kvvm._lib as l; assert l.loaded_path() is None; print(kvvm.__version__)\n"
            "try:\n    kvvm.Cache(max_slots=1, max_tokens=1, budget_bytes=1)\n"
            "except OSError as e:\n    print('OSError', e)\n")
    env = dict(os.environ, KVVM_LIBRARY="/nonexistent/libkvvm.so", PYTHONPATH=str(ROOT / "python"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(kvvm.__version__ + "\n")
    if not _lib._bundled():
        assert "OSError KVVM_LIBRARY=/nonexistent/libkvvm.so is not a file" in out
