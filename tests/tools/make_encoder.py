"""Writes a BERT-shaped sentence encoder with random weights, laid out as the usual exporters do.

Usage: make_encoder.py OUT.onnx [--layers N] [--hidden H] [--heads A] [--ffn F] [--vocab V]
                       [--max-pos P] [--seed S] [--external]

Inputs input_ids, attention_mask, token_type_ids (int64 [batch, sequence], both dims symbolic);
output last_hidden_state (float [batch, sequence, hidden]). Word, position (Range over the sequence's
length, Gathered from a [P, H] table) and segment embeddings; per layer a fused QKV-free attention
(three MatMuls, heads split by Reshape/Transpose, Softmax over the keys with the mask added as
(1 - mask) * -10000), a GELU (erf) feed-forward and post-LayerNorms (opset 17). Weights are
N(0, 0.02) from the seed, so the same arguments write the same bytes. With the defaults (6 layers,
384 wide, vocabulary 30522) it is the size of all-MiniLM-L6-v2: 22.7M parameters, 91 MB.
"""

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--max-pos", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--external", action="store_true", help="weights in OUT.data")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    H, A, F = a.hidden, a.heads, a.ffn
    D = H // A
    inits, nodes = [], []

    def w(name, *shape, scale=0.02):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def n(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def ones(name, size):
        inits.append(numpy_helper.from_array(np.ones(size, np.float32), name))
        return name

    def zeros(name, size):
        inits.append(numpy_helper.from_array(np.zeros(size, np.float32), name))
        return name

    # Embeddings.
    c("zero", 0)
    c("one", 1)
    shape = n("Shape", ["input_ids"], "ids_shape")
    seq = n("Gather", [shape, "one"], "seq_len", axis=0)
    pos = n("Range", ["zero", seq, "one"], "position_ids")
    x = n("Gather", [w("word_embeddings", a.vocab, H), "input_ids"], "word_emb")
    p = n("Gather", [w("position_embeddings", a.max_pos, H), pos], "pos_emb")
    t = n("Gather", [w("token_type_embeddings", 2, H), "token_type_ids"], "type_emb")
    x = n("Add", [x, p], "emb_wp")
    x = n("Add", [x, t], "emb")
    x = n("LayerNormalization", [x, ones("emb_ln_g", H), zeros("emb_ln_b", H)], "emb_ln", axis=-1, epsilon=1e-12)
    # Mask: [batch, 1, 1, sequence] of 0 or -10000.
    m = n("Unsqueeze", ["attention_mask", c("mask_axes", [1, 2])], "mask4")
    m = n("Cast", [m], "maskf", to=TensorProto.FLOAT)
    m = n("Sub", [c("onef", 1.0, np.float32), m], "mask_inv")
    m = n("Mul", [m, c("neg", -10000.0, np.float32)], "mask_add")
    c("heads_shape", [0, 0, A, D])
    c("merge_shape", [0, 0, H])
    c("scale", 1.0 / np.sqrt(D), np.float32)
    c("sqrt2", np.sqrt(2.0), np.float32)
    c("half", 0.5, np.float32)
    for L in range(a.layers):
        pre = f"l{L}_"

        def proj(src, name, k, m_):
            y = n("MatMul", [src, w(pre + name + "_w", k, m_)], pre + name)
            return n("Add", [y, zeros(pre + name + "_b", m_)], pre + name + "_out")

        def heads(y, name, perm):
            y = n("Reshape", [y, "heads_shape"], pre + name + "_heads")
            return n("Transpose", [y], pre + name + "_t", perm=perm)

        q = heads(proj(x, "q", H, H), "q", [0, 2, 1, 3])
        k = heads(proj(x, "k", H, H), "k", [0, 2, 3, 1])
        v = heads(proj(x, "v", H, H), "v", [0, 2, 1, 3])
        s = n("MatMul", [q, k], pre + "scores")
        s = n("Mul", [s, "scale"], pre + "scaled")
        s = n("Add", [s, m], pre + "masked")
        s = n("Softmax", [s], pre + "probs", axis=-1)
        y = n("MatMul", [s, v], pre + "context")
        y = n("Transpose", [y], pre + "context_t", perm=[0, 2, 1, 3])
        y = n("Reshape", [y, "merge_shape"], pre + "context_m")
        y = proj(y, "o", H, H)
        x = n("Add", [x, y], pre + "res1")
        x = n("LayerNormalization", [x, ones(pre + "ln1_g", H), zeros(pre + "ln1_b", H)], pre + "ln1", axis=-1, epsilon=1e-12)
        h = proj(x, "ffn_in", H, F)
        g = n("Div", [h, "sqrt2"], pre + "gelu_d")
        g = n("Erf", [g], pre + "gelu_e")
        g = n("Add", [g, c(pre + "gelu_one", 1.0, np.float32)], pre + "gelu_a")
        g = n("Mul", [h, g], pre + "gelu_m")
        g = n("Mul", [g, "half"], pre + "gelu")
        y = proj(g, "ffn_out", F, H)
        x = n("Add", [x, y], pre + "res2")
        x = n("LayerNormalization", [x, ones(pre + "ln2_g", H), zeros(pre + "ln2_b", H)], pre + "ln2", axis=-1, epsilon=1e-12)
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))

    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims + [H])]
    graph = helper.make_graph(nodes, "encoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_encoder")
    model.ir_version = 8
    if a.external:
        location = a.out.rsplit("/", 1)[-1] + ".data"
        onnx.save_model(model, a.out, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    else:
        onnx.save_model(model, a.out)
    onnx.checker.check_model(a.out)
    params = sum(int(np.prod(i.dims)) for i in inits)
    print(f"{a.out}: {params} parameters")


if __name__ == "__main__":
    main()
