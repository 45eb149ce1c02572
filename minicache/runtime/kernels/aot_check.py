"""Compile the kernels for a GPU architecture without a GPU (CI check for GPU-only compile errors).

Triton's interpreter runs kernels as NumPy code and skips most of the compiler: type unification of
``if`` branches, access to globals, shared-memory limits and the like only fail when a kernel is
compiled for a real target. Triton's wheel ships the whole NVIDIA toolchain (``ptxas`` included),
so ``triton.compile`` can build a cubin on a machine without a GPU; this module does that for the
kernel variants the runtime launches and reports their shared memory against the target's limit
(register counts and spills need a GPU driver to read back, so they are not reported).

Run it in a process *without* ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels)::

    python -m minicache.runtime.kernels.aot_check --arch 90          # H100
    python -m minicache.runtime.kernels.aot_check --arch 80 --full   # A100, every variant
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Shared memory one block may use (bytes), by compute capability (CUDA programming guide).
_MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _signature(fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, Any]):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(fn, pointers, floats, constexprs, arch: int, options: dict | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=fn,
        signature=_signature(fn, pointers, floats, constexprs),
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return {
        "kernel": fn.__name__,
        "arch": arch,
        "shared_bytes": kernel.metadata.shared,
        "num_warps": kernel.metadata.num_warps,
        "fits_shared": kernel.metadata.shared <= _MAX_SHARED.get(arch, 101376),
        "has_cubin": bool(kernel.asm.get("cubin")),
    }


def decode_variants(full: bool) -> list[dict[str, Any]]:
    """(dtype, G, D, use_magnitude, mask kind, value rotation, packed bits[, pre-RoPE keys]) combinations
    the decode kernel is launched with (``bits`` 0: model-dtype store; ``mag`` False with bits: an
    unmerged quantized layer)."""
    if not full:
        return [
            {"dtype": "bf16", "G": 8, "D": 128, "mag": True, "mask": "bool", "vrot": False, "bits": 0},
            {"dtype": "bf16", "G": 3, "D": 64, "mag": True, "mask": "bool", "vrot": True, "bits": 0},
            {"dtype": "fp32", "G": 1, "D": 64, "mag": True, "mask": None, "vrot": True, "bits": 0},
            {"dtype": "bf16", "G": 3, "D": 64, "mag": True, "mask": "bool", "vrot": True, "bits": 4},
            {"dtype": "bf16", "G": 8, "D": 128, "mag": False, "mask": "bool", "vrot": False, "bits": 2},
            # Unmerged rotated layers whose keys were packed before RoPE (two [D, D] maps per program).
            {"dtype": "bf16", "G": 3, "D": 64, "mag": False, "mask": "bool", "vrot": True, "bits": 3, "rope": True},
            {"dtype": "bf16", "G": 8, "D": 128, "mag": False, "mask": "bool", "vrot": True, "bits": 3, "rope": True},
            {"dtype": "fp32", "G": 3, "D": 64, "mag": False, "mask": "bool", "vrot": True, "bits": 3, "rope": True},
            # Unmerged rotated-lloyd layers: 2-bit codes index a table of levels.
            {"dtype": "bf16", "G": 3, "D": 64, "mag": False, "mask": "bool", "vrot": True, "bits": 2, "levels": True},
        ]
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for g, d in ((1, 64), (4, 128), (8, 128), (1, 256)):
            for mag, mask in ((True, "bool"), (True, "float"), (True, None), (False, None)):
                for vrot in (False, True) if mag else (False,):
                    for bits in (0, 4, 2):
                        v = {"dtype": dtype, "G": g, "D": d, "mag": mag, "mask": mask, "vrot": vrot, "bits": bits}
                        out.append(v)
    return out


def compile_all(arch: int = 90, full: bool = False) -> list[dict]:
    """Compile merge and decode kernels for ``sm_<arch>``; one report dict per compiled kernel."""
    import torch
    import triton

    from minicache.runtime.kernels import decode, merge

    reports = []
    merge_dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    for dtype in merge_dtypes:
        for global_range in (False, True) if full else (False,):
            pointers = {"xa_ptr": f"*{dtype}", "xb_ptr": f"*{dtype}", "dir_ptr": f"*{dtype}"}
            pointers.update({"mag_ptr": "*fp32" if dtype == "fp32" else "*fp16", "keep_ptr": "*i8"})
            pointers.update({"real_ptr": "*u8", "sink_ptr": "*u8"})
            constexprs = {
                "D": 128,
                "BLOCK_D": 128,
                "BLOCK_N": 64,
                "GAMMA_MODE": 1,
                "DISTINCT": True,
                "GLOBAL_RANGE": global_range,
                "SIN_EPS": 1e-4,
                "NORM_EPS": 1e-12,
                "FLAG": -1.0,
            }
            report = _compile(merge._merge_kernel, pointers, ("t", "gamma"), constexprs, arch)
            reports.append({**report, "variant": {"dtype": dtype, "global_range": global_range}})
    for v in decode_variants(full):
        dtype, d = v["dtype"], v["D"]
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        block_n = decode.decode_block_tokens(d, torch_dtype, rope=v.get("rope", False))
        # qr_ptr: the query in the keys' aligned frame, in the cache dtype; rv_ptr: value rotations, fp32.
        dense = ("q_ptr", "qr_ptr", "kd_ptr", "vd_ptr", "kr_ptr", "vr_ptr", "k_val_ptr", "v_val_ptr")
        pointers = {n: f"*{dtype}" for n in dense}
        pointers.update({n: "*fp32" if dtype == "fp32" else "*fp16" for n in ("km_ptr", "vm_ptr")})
        for c in "kv":
            pointers.update({f"{c}_{n}_ptr": "*i32" for n in ("off", "pos", "row", "cross")})
        pointers["mask_ptr"] = "*u8" if v["mask"] in ("bool", None) else "*fp32"
        # Packed parts: codes as bytes; scales and zero points fp16 (fp32 for fp32 models); stand-ins
        # of the same types when nothing is packed.
        scale_type = "*fp32" if (dtype == "fp32" and v["bits"]) else "*fp16"
        pointers.update({n: "*u8" for n in ("kq_ptr", "vq_ptr", "krq_ptr", "vrq_ptr")})
        for n in ("ks", "kz", "vs", "vz", "krs", "krz", "vrs", "vrz"):
            pointers[f"{n}_ptr"] = scale_type
        pointers.update({"rk_ptr": f"*{dtype}", "freq_ptr": "*fp32", "cscale_ptr": "*fp32"})  # pre-RoPE keys
        constexprs = {
            "G": v["G"],
            "BLOCK_G": max(16, triton.next_power_of_2(v["G"])),
            "BLOCK_N": block_n,
            "BLOCK_R": decode._BLOCK_R,
            "D": d,
            "BLOCK_D": d,
            "HAS_MAG": v["mag"],
            "HAS_VROT": v["vrot"],
            "HAS_MASK": v["mask"] is not None,
            "MASK_BOOL": v["mask"] == "bool",
            "DOT_MODE": decode._DOT_IEEE if dtype == "fp32" else decode._DOT_NATIVE,
            "NORM_EPS": 1e-12,
            # Merged stores pack both sides and their retained vectors to one width; mixed widths and
            # exact retained sinks are other specialisations of the same code.
            "K_QBITS": v["bits"],
            "V_QBITS": v["bits"],
            "KR_QBITS": v["bits"],
            "VR_QBITS": v["bits"],
            "K_GROUP": 128 if v["bits"] else 1,
            "K_PER_TOKEN": False,
            "V_GROUP": min(128, d) if v["bits"] else 1,
            "V_PER_TOKEN": True,
            "R_GROUP": min(128, d) if v["bits"] else 1,
            "RTNE": False,
            "ROPE_K": v.get("rope", False),
            "K_LEVELS": v.get("levels", False),
            "V_LEVELS": v.get("levels", False),
        }
        options = {"num_stages": decode.num_stages(torch_dtype)}
        report = _compile(decode._decode_partial_kernel, pointers, ("qk_scale",), constexprs, arch, options)
        reports.append({**report, "variant": v})
    combine = {"G": 8, "BLOCK_G": 16, "D": 128, "BLOCK_D": 128}
    reports.append(_compile(decode._decode_combine_kernel, {"out_ptr": "*bf16"}, (), combine, arch))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100)")
    parser.add_argument("--full", action="store_true", help="every dtype / GQA / head_dim / mask variant")
    args = parser.parse_args(argv)
    from minicache.runtime.kernels import interpreter_enabled

    if interpreter_enabled():
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels that this check compiles")
        return 2
    reports = compile_all(args.arch, args.full)
    print(json.dumps(reports, indent=1))
    bad = [r for r in reports if not (r["fits_shared"] and r["has_cubin"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
