"""Runs pairs of ONNX models (an original and quench's re-save of it) in onnxruntime on the same inputs
and checks that the outputs are bitwise equal; where reference outputs exist (the onnx backend test data)
it also checks the original against them. Test tooling only: quench itself never runs Python.

usage: ort_roundtrip.py MANIFEST.json
The manifest is a list of {"name", "original", "candidate", "data_sets": [dir, ...], "inputs": spec|null}.
Prints one line per model and a JSON summary; exits 1 when any pair differs.
"""

import glob
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

DTYPES = {
    "float32": np.float32, "float": np.float32, "float16": np.float16, "float64": np.float64,
    "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}
ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def generated_inputs(sess, spec, seed):
    rng = np.random.default_rng(seed)
    by_name = {s["name"]: s for s in (spec or [])}
    feeds = {}
    for i in sess.get_inputs():
        s = by_name.get(i.name)
        if s is not None:
            dtype = DTYPES[s["dtype"]]
            shape = tuple(s["dims"])
            if s.get("values"):
                feeds[i.name] = rng.choice(np.array(s["values"]), size=shape).astype(dtype)
                continue
            lo, hi = s.get("range") or (0, 1)
        else:
            dtype = ORT_TYPES.get(i.type)
            if dtype is None:
                raise RuntimeError(f"input {i.name} has type {i.type}, which needs an input spec")
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape)
            lo, hi = (-1.0, 1.0) if np.issubdtype(dtype, np.floating) else (0, 1)
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.uniform(lo, hi, size=shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[i.name] = rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
    return feeds


def data_set_inputs(sess, folder):
    names = [i.name for i in sess.get_inputs()]
    feeds, refs = {}, []
    for k, path in enumerate(sorted(glob.glob(os.path.join(folder, "input_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))):
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        feeds[t.name or names[k]] = numpy_helper.to_array(t)
    for path in sorted(glob.glob(os.path.join(folder, "output_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3])):
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        refs.append(numpy_helper.to_array(t))
    return feeds, refs


def bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:  # strings: compare the values, not the object pointers
        return a.tolist() == b.tolist()
    return a.tobytes() == b.tobytes()


def main():
    manifest = json.load(open(sys.argv[1]))
    summary = {"pairs": 0, "equal": 0, "different": 0, "ort_cannot_run": 0, "reference_checked": 0,
               "reference_mismatch": 0, "checker_passed": 0, "failures": []}
    for item in manifest:
        summary["pairs"] += 1
        name = item["name"]
        try:
            a = session(item["original"])
        except Exception as e:  # the runtime cannot load the original: the copy must fail alike
            try:
                session(item["candidate"])
                summary["failures"].append(f"{name}: ORT rejects the original ({str(e)[:120]}) but loads the copy")
            except Exception:
                summary["ort_cannot_run"] += 1
                print(f"{name}: ORT cannot load the original nor the copy")
            continue
        b = session(item["candidate"])
        # A copy of a model that passes the full ONNX check must pass it too.
        try:
            onnx.checker.check_model(item["original"], full_check=True)
            original_valid = True
        except Exception:
            original_valid = False
        if original_valid:
            summary["checker_passed"] += 1
            try:
                onnx.checker.check_model(item["candidate"], full_check=True)
            except Exception as e:
                summary["failures"].append(f"{name}: the copy fails onnx.checker: {str(e)[:200]}")
        runs = []
        for folder in item.get("data_sets") or []:
            runs.append(data_set_inputs(a, folder))
        if not runs:
            runs.append((generated_inputs(a, item.get("inputs"), 0), []))
        ok = True
        for feeds, refs in runs:
            try:
                out_a = a.run(None, feeds)
            except Exception as e:
                try:
                    b.run(None, feeds)
                    summary["failures"].append(f"{name}: original fails to run ({str(e)[:100]}) but the copy runs")
                    ok = False
                except Exception:
                    summary["ort_cannot_run"] += 1
                continue
            out_b = b.run(None, feeds)
            if len(out_a) != len(out_b) or not all(bitwise_equal(x, y) for x, y in zip(out_a, out_b)):
                ok = False
                summary["failures"].append(f"{name}: outputs differ between the original and the copy")
            for x, r in zip(out_a, refs):
                summary["reference_checked"] += 1
                try:
                    x = np.asarray(x)
                    if np.issubdtype(x.dtype, np.number):
                        np.testing.assert_allclose(x, r, rtol=1e-3, atol=1e-6)
                    elif not np.array_equal(x, r):
                        raise AssertionError("differs")
                except (AssertionError, TypeError, ValueError):
                    summary["reference_mismatch"] += 1
                    print(f"{name}: ORT output differs from the reference data (not a round-trip problem)")
        if ok:
            summary["equal"] += 1
        else:
            summary["different"] += 1
    print(json.dumps(summary))
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
