#!/usr/bin/env python3
"""torch reads kvvm's KV views through DLPack and feeds them to SDPA unchanged.

For both layouts (interleaved: K/V of a layer are strided views with a large token stride;
per-layer: plain [tokens, kv_heads, head_dim] buffers), this check

1. exports one layer's K and V of several slots with ``torch.from_dlpack`` and checks shape,
   dtype, device, strides and that the tensor aliases the cache's memory (no copy);
2. writes random K/V through those tensors and reads them back through fresh exports (of the
   slot and of the whole batch), so the bytes really live in the cache;
3. runs ``torch.nn.functional.scaled_dot_product_attention`` on the views as they are (only
   permuted, never made contiguous) for one decode query per slot, and compares the result with
   a float64 reference and with SDPA on contiguous copies;
4. stream-ordered swapping (docs/ordering.md): with torch's current stream registered
   (``cache.set_stream``), a kernel writes a slot's K/V and the slot is swapped out at once (the
   copy waits for the kernel on the device), swapped back into another slot, and SDPA reads it on
   the stream right after ``ticket.stream_wait(stream)``, without the host waiting; the output
   must match the reference.

Usage: ``KVVM_LIBRARY=target/release/libkvvm.so PYTHONPATH=python
python3 scripts/gpu/torch_dlpack_check.py [--backend cuda|host] [--dtype f16|bf16|f32]
[--json-out FILE]``. Exit status 0 if every check passed, 1 if one failed, 2 if torch or the
device is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

LAYOUTS = ("interleaved", "per-layer")
LAYERS, KV_HEADS, HEAD_DIM, GROUP = 4, 8, 128, 4
MAX_SLOTS, MAX_TOKENS = 4, 512
LENS = (1, 17, 300, 512)  # one token, block and page edges, a full slot
LAYER = 2
TOLERANCE = {"f16": 5e-3, "bf16": 4e-2, "f32": 1e-5}


def rel_err(got, want) -> float:
    scale = want.abs().max().clamp_min(1e-30)
    return float((got.double() - want).abs().max() / scale)


def supports_gqa(torch, F) -> bool:
    """Whether SDPA takes ``enable_gqa`` (torch >= 2.5); without it the check uses as many query
    heads as KV heads, so that the views still go in unchanged."""
    z = torch.zeros
    try:
        F.scaled_dot_product_attention(z(1, 2, 1, 8), z(1, 1, 1, 8), z(1, 1, 1, 8), enable_gqa=True)
        return True
    except TypeError:
        return False


def check_layout(kvvm, torch, layout: str, args, device) -> dict:
    import torch.nn.functional as F

    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    result = {"layout": layout, "slots": [], "ok": True}
    host = args.backend == "host"
    cache = kvvm.Cache(
        layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=args.dtype, layout=layout,
        max_slots=MAX_SLOTS, max_tokens=MAX_TOKENS, budget_bytes=1 << 30,
        backend=args.backend, host_granularity=(64 << 10) if host else 0, lookahead_steps=0,
    )
    try:
        slots = [cache.alloc_slot() for _ in LENS]
        for s, n in zip(slots, LENS):
            cache.ensure(s, n)
        info = {kv: cache.layer_view(LAYER, kv) for kv in ("k", "v")}
        itemsize = info["k"].itemsize
        gqa = supports_gqa(torch, F)
        q_heads = KV_HEADS * (GROUP if gqa else 1)
        result["enable_gqa"] = gqa
        result["token_stride"] = info["k"].strides[1]
        for s, n in zip(slots, LENS):
            row = {"slot": s, "tokens": n}
            ref = {}
            for kv in ("k", "v"):
                t = torch.from_dlpack(cache.view(LAYER, kv, slot=s, tokens=n))
                strides = tuple(info[kv].strides[1:])
                expect_ptr = info[kv].data + s * info[kv].strides[0] * itemsize
                problems = []
                if tuple(t.shape) != (n, KV_HEADS, HEAD_DIM):
                    problems.append(f"shape {tuple(t.shape)}")
                if t.dtype != tdtype:
                    problems.append(f"dtype {t.dtype}")
                if t.device != device:
                    problems.append(f"device {t.device}")
                if n > 1 and t.stride() != strides:
                    problems.append(f"strides {t.stride()} != cache {strides}")
                if t.data_ptr() != expect_ptr:
                    problems.append(f"data_ptr {t.data_ptr():#x} != cache {expect_ptr:#x}")
                if problems:
                    raise AssertionError(f"slot {s} {kv}: " + ", ".join(problems))
                r = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=tdtype)
                t.copy_(r)  # writes into the cache through the view
                ref[kv] = r
                del t
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # Fresh exports see the bytes: the slot's view and the whole batch's view.
            k = torch.from_dlpack(cache.view(LAYER, "k", slot=s, tokens=n))
            v = torch.from_dlpack(cache.view(LAYER, "v", slot=s, tokens=n))
            batch_k = torch.from_dlpack(cache.view(LAYER, "k"))
            if tuple(batch_k.shape) != (MAX_SLOTS, MAX_TOKENS, KV_HEADS, HEAD_DIM):
                raise AssertionError(f"batch view shape {tuple(batch_k.shape)}")
            if not torch.equal(k, ref["k"]) or not torch.equal(v, ref["v"]):
                raise AssertionError(f"slot {s}: K/V read back differ from what was written")
            if not torch.equal(batch_k[s, :n], ref["k"]):
                raise AssertionError(f"slot {s}: the batch view disagrees with the slot view")
            if host:
                raw = cache.read_row(s, n - 1, LAYER, "k")
                if raw != ref["k"][n - 1].cpu().contiguous().view(torch.uint8).numpy().tobytes():
                    raise AssertionError(f"slot {s}: the library reads other bytes than torch wrote")
            # SDPA on the views as they are: [tokens, H, D] -> [1, H, tokens, D] is a permutation.
            k4 = k.permute(1, 0, 2).unsqueeze(0)
            v4 = v.permute(1, 0, 2).unsqueeze(0)
            if k4.data_ptr() != k.data_ptr():
                raise AssertionError("permute copied")
            q = torch.randn(1, q_heads, 1, HEAD_DIM, generator=gen).to(device=device, dtype=tdtype)
            extra = {"enable_gqa": True} if gqa else {}
            out = F.scaled_dot_product_attention(q, k4, v4, **extra)
            out_c = F.scaled_dot_product_attention(q, k4.contiguous(), v4.contiguous(), **extra)
            # float64 reference.
            kd = ref["k"].double().permute(1, 0, 2).repeat_interleave(q_heads // KV_HEADS, dim=0)
            vd = ref["v"].double().permute(1, 0, 2).repeat_interleave(q_heads // KV_HEADS, dim=0)
            qd = q.double()[0]  # [q_heads, 1, D]
            w = torch.softmax(qd @ kd.transpose(1, 2) / HEAD_DIM**0.5, dim=-1)
            want = (w @ vd).unsqueeze(0)
            row["rel_err_vs_reference"] = rel_err(out, want)
            row["rel_err_vs_contiguous"] = rel_err(out, out_c.double())
            row["ok"] = (row["rel_err_vs_reference"] < TOLERANCE[args.dtype]
                         and row["rel_err_vs_contiguous"] < TOLERANCE[args.dtype])
            result["ok"] &= row["ok"]
            result["slots"].append(row)
            del k, v, batch_k, k4, v4
    except Exception as e:  # recorded, so that the other layout still runs
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    finally:
        cache.close()
    return result


def check_stream_ordered(kvvm, torch, layout: str, args, device) -> dict:
    """Swap-out ordered after a kernel that writes the slot, and a swap-in consumed by SDPA in
    stream order (no host synchronization between enqueueing and the SDPA)."""
    import torch.nn.functional as F

    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    result = {"layout": f"stream-ordered {layout}", "slots": [], "ok": True}
    host = args.backend == "host"
    n = 300
    cache = kvvm.Cache(
        layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=args.dtype, layout=layout,
        max_slots=MAX_SLOTS, max_tokens=MAX_TOKENS, budget_bytes=1 << 30,
        backend=args.backend, host_granularity=(64 << 10) if host else 0, lookahead_steps=0,
    )
    swap = kvvm.SwapEngine(cache, chunk_bytes=1 << 20)
    try:
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        if stream is not None:
            cache.set_stream(stream)
        gen = torch.Generator(device="cpu").manual_seed(99)
        ref = {kv: torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype=tdtype)
               for kv in ("k", "v")}
        # Whole-batch views, exported once: later reads need no call into the library.
        batch = {kv: torch.from_dlpack(cache.view(LAYER, kv)) for kv in ("k", "v")}
        src = cache.alloc_slot(n)
        cache.ensure(src, n)
        # The "kernel" writing the KV: an asynchronous copy on the stream, from device memory.
        staged = {kv: ref[kv].to(device=device) for kv in ("k", "v")}
        if stream is not None:
            torch.cuda.synchronize(device)
            torch.cuda._sleep(50_000_000)  # the stream stays busy: the write lands late
        for kv in ("k", "v"):
            batch[kv][src, :n].copy_(staged[kv], non_blocking=True)
        out = swap.swap_out(src)  # no synchronization: the copy waits for the write
        out.wait()
        dst = cache.alloc_slot(n)
        t = swap.swap_in(out.copy, dst)
        t.stream_wait(stream if stream is not None else 0)
        q = torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen).to(device=device, dtype=tdtype)
        k4 = batch["k"][dst, :n].permute(1, 0, 2).unsqueeze(0)
        v4 = batch["v"][dst, :n].permute(1, 0, 2).unsqueeze(0)
        got = F.scaled_dot_product_attention(q, k4, v4)  # enqueued right after the wait
        if stream is not None:
            torch.cuda.synchronize(device)
        t.wait()
        kd = ref["k"].double().permute(1, 0, 2)
        vd = ref["v"].double().permute(1, 0, 2)
        w = torch.softmax(q.double().cpu()[0] @ kd.transpose(1, 2) / HEAD_DIM**0.5, dim=-1)
        want = (w @ vd).unsqueeze(0)
        err = rel_err(got.cpu(), want)
        row = {"slot": dst, "tokens": n, "rel_err_vs_reference": err,
               "rel_err_vs_contiguous": err, "ok": err < TOLERANCE[args.dtype]}
        result["slots"].append(row)
        result["ok"] = row["ok"]
        swap.release(out.copy)
        cache.free_slot(dst)
        del batch, k4, v4
    except Exception as e:  # recorded, so that the other layout still runs
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    finally:
        swap.close()
        cache.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("cuda", "host"), default="cuda")
    ap.add_argument("--dtype", choices=tuple(TOLERANCE), default="f16")
    ap.add_argument("--json-out", help="write the results as JSON here too")
    args = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        print(f"torch_dlpack_check: torch is not installed ({e})")
        return 2
    if args.backend == "cuda":
        if not torch.cuda.is_available():
            print("torch_dlpack_check: torch sees no CUDA device")
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    import kvvm

    results = {
        "torch": torch.__version__,
        "kvvm": kvvm.version(),
        "backend": args.backend,
        "dtype": args.dtype,
        "layouts": [check_layout(kvvm, torch, layout, args, device) for layout in LAYOUTS]
        + [check_stream_ordered(kvvm, torch, layout, args, device) for layout in LAYOUTS],
    }
    results["ok"] = all(r["ok"] for r in results["layouts"])
    for r in results["layouts"]:
        print(f"{r['layout']:<12} {'ok' if r['ok'] else 'FAIL'}  "
              f"token stride {r.get('token_stride')}  gqa {r.get('enable_gqa')}")
        for row in r["slots"]:
            print(f"   slot {row['slot']} tokens {row['tokens']:>4}: rel err vs float64 "
                  f"{row['rel_err_vs_reference']:.2e}, vs contiguous {row['rel_err_vs_contiguous']:.2e}")
        if "error" in r:
            print("   " + r["traceback"].replace("\n", "\n   "))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    print("torch_dlpack_check:", "ok" if results["ok"] else "FAILED")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
