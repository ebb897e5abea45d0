"""The image encoder: contract checks on load (incl. corrupt files) and the shipped model's
accuracy on freshly rendered frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlarl.graph import package_root
from vlarl.perception.encoder import EncoderError, EncoderMetadata, ImageEncoder

SHIPPED = package_root() / "models" / "image_encoder.onnx"


def tiny_encoder(
    path: Path,
    *,
    features: int = 2,
    size: int = 8,
    input_name: str = "image",
    output_name: str = "features",
    meta: EncoderMetadata | None = None,
    props: dict[str, str] | None = None,
    weight: float = 1.0,
) -> Path:
    """features = mean over pixels of each channel, mixed by a [3, F] matrix."""
    w = np.full((3, features), weight, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [input_name], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], [output_name]),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", features])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if meta is None:
        meta = EncoderMetadata(
            model_id="tiny",
            version=3,
            feature_names=tuple(f"f{i}" for i in range(features)),
            input_height=size,
            input_width=size,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            camera="corner3",
        )
    for key, value in (meta.to_props() if props is None else props).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_tiny_encoder_loads_and_encodes(tmp_path):
    encoder = ImageEncoder(tiny_encoder(tmp_path / "e.onnx"))
    assert encoder.metadata.tag == "tiny@3" and encoder.feature_names == ("f0", "f1")
    frame = np.full((16, 16, 3), 255, dtype=np.uint8)  # resized to 8x8, normalized to 1.0
    assert np.allclose(encoder.encode(frame), [3.0, 3.0], atol=1e-5)
    batch = encoder.encode_frames([frame, np.zeros_like(frame)])
    assert batch.shape == (2, 2) and np.allclose(batch[1], 0.0)
    with pytest.raises(EncoderError, match=r"float32 \[B, 3, 8, 8\]"):
        encoder(np.zeros((1, 3, 9, 9), dtype=np.float32))


def test_metadata_round_trip():
    meta = EncoderMetadata(
        model_id="m",
        version=1,
        feature_names=("a", "b"),
        input_height=84,
        input_width=84,
        crop=(0.0, 0.1, 1.0, 0.9),
        tasks=("reach-v3",),
        held_out_mae={"a": 0.01},
    )
    assert EncoderMetadata.from_props(meta.to_props()) == meta


def test_corrupt_and_missing_files_are_refused(tmp_path):
    with pytest.raises(EncoderError, match="not found"):
        ImageEncoder(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(EncoderError, match="cannot load encoder"):
        ImageEncoder(corrupt)
    good = tiny_encoder(tmp_path / "good.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(EncoderError, match="cannot load encoder"):
        ImageEncoder(truncated)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "pixels"}, "exactly one input 'image'"),
        ({"output_name": "out"}, "no output 'features'"),
        ({"props": {}}, "missing metadata keys"),
        ({"weight": float("nan")}, "non-finite features"),
    ],
)
def test_contract_violations_are_refused(tmp_path, kwargs, message):
    with pytest.raises(EncoderError, match=message):
        ImageEncoder(tiny_encoder(tmp_path / "bad.onnx", **kwargs))


def test_metadata_that_disagrees_with_the_graph_is_refused(tmp_path):
    base = EncoderMetadata(
        model_id="tiny", version=0, feature_names=("a", "b", "c"), input_height=8, input_width=8
    )
    with pytest.raises(EncoderError, match=r"must be \[batch, 3\]"):
        ImageEncoder(tiny_encoder(tmp_path / "a.onnx", features=2, meta=base))
    wrong_size = EncoderMetadata(
        model_id="tiny", version=0, feature_names=("a", "b"), input_height=16, input_width=16
    )
    with pytest.raises(EncoderError, match=r"must be \[batch, 3, 16, 16\]"):
        ImageEncoder(tiny_encoder(tmp_path / "b.onnx", meta=wrong_size))
    props = base.to_props()
    props["vlarl.encoder.contract"] = "99"
    with pytest.raises(EncoderError, match="contract '99'"):
        ImageEncoder(tiny_encoder(tmp_path / "c.onnx", props=props))
    props = base.to_props()
    props["vlarl.encoder.feature_names"] = '["a", "a"]'
    with pytest.raises(EncoderError, match="distinct"):
        ImageEncoder(tiny_encoder(tmp_path / "d.onnx", props=props))


def test_shipped_encoder_estimates_poses_on_unseen_layouts():
    """Frames of a seed the encoder never saw: hand/object/goal within a few cm."""
    from metaworld.policies import ENV_POLICY_MAP

    from vlarl.sim.layout import POSE_FEATURE_INDEX
    from vlarl.sim.render import CameraConfig, OffscreenRenderer
    from vlarl.sim.robot import MetaWorldRobot

    encoder = ImageEncoder(SHIPPED)
    meta = encoder.metadata
    assert meta.feature_names[:3] == ("hand_x", "hand_y", "hand_z")
    config = CameraConfig(camera=meta.camera, width=meta.frame_width, height=meta.frame_height)
    frames, truth = [], []
    with MetaWorldRobot("pick-place-v3", seed=987_654) as robot, OffscreenRenderer(config) as r:
        policy = cast(Any, ENV_POLICY_MAP["pick-place-v3"])()
        for episode in range(2):
            robot.reset(episode=episode)
            for step in range(60):
                if robot.done:
                    break
                if step % 15 == 3:
                    frames.append(r.render_data(robot.model, robot.data))
                    truth.append(robot.state[list(POSE_FEATURE_INDEX)].copy())
                robot.step(np.clip(policy.get_action(robot.state), -1, 1))
    error = np.abs(encoder.encode_frames(frames) - np.asarray(truth)).mean(axis=0)
    spread = np.asarray(truth).std(axis=0)
    print(f"\nunseen-layout MAE per feature: {np.round(error, 4).tolist()} ({len(frames)} frames)")
    assert error[0:3].mean() < 0.03, f"hand xyz error {error[0:3]} m"
    assert error[4:7].mean() < 0.05, f"object xyz error {error[4:7]} m"
    assert error[7:10].mean() < 0.08, f"goal xyz error {error[7:10]} m"
    # Better than knowing nothing: hand error well below the hand's own spread.
    assert error[0:3].mean() < 0.5 * spread[0:3].mean()
