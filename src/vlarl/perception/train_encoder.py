"""Train the image encoder: a small CNN that estimates the task's poses from one camera frame.

A learned pose estimator for the embedded robot. Frames are rendered from Meta-World rollouts of
the scripted experts with Gaussian action noise (so the arm, the gripper and the objects visit
more of the workspace than a clean demonstration would); the targets are the privileged state's
pose features (:data:`vlarl.sim.layout.POSE_FEATURES`: hand xyz, gripper opening, object xyz,
goal xyz). Whole seed groups (sets of layouts) are held out for the error report, so it measures
layouts the encoder never saw. The network (conv stack -> spatial soft-argmax keypoints + pooled
features -> MLP) outputs features in metres; target normalization lives inside the exported
graph. Export: ONNX with the encoder contract's metadata
(:mod:`vlarl.perception.encoder`), then the file is re-loaded through :class:`ImageEncoder` and
checked against the PyTorch outputs.

    python -m vlarl.perception.train_encoder --out models/image_encoder.onnx \
        --cache data/encoder_frames.npz

Rendering is the slow part (~80-100 ms per frame on CPU); ``--cache`` keeps the frames so that
re-training skips it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from vlarl.perception.encoder import INPUT_IMAGE, OUTPUT_FEATURES, EncoderMetadata, ImageEncoder
from vlarl.perception.preprocess import PreprocessConfig, Preprocessor, channel_stats
from vlarl.sim.layout import POSE_FEATURE_INDEX, POSE_FEATURE_NAMES
from vlarl.sim.render import DEFAULT_CAMERA, CameraConfig, OffscreenRenderer

DEFAULT_TASKS = ("pick-place-v3", "push-v3", "reach-v3")
NOISE_LEVELS = (0.0, 0.3, 0.6, 1.0)


@dataclass(frozen=True, slots=True)
class CollectConfig:
    """What frames to render."""

    tasks: tuple[str, ...] = DEFAULT_TASKS  # Meta-World tasks to roll out
    frames_per_task: int = 1000  # frames rendered per task
    every: int = 8  # render every n-th step of an episode (few frames, many layouts)
    max_steps: int = 200  # episode cap (experts finish in ~50-100 steps)
    episodes_per_seed: int = 10  # a new robot seed (a new set of 50 layouts) after this many
    seed: int = 1234  # first robot seed and noise seed
    camera: CameraConfig = field(default_factory=CameraConfig)  # camera and frame size


@dataclass
class Dataset:
    frames: np.ndarray  # uint8 [N, h, w, 3]
    targets: np.ndarray  # float32 [N, F]
    episode: np.ndarray  # int [N], unique over tasks
    group: np.ndarray  # int [N], robot-seed group (frames of one group share layouts)
    task: np.ndarray  # int [N], index into tasks
    tasks: tuple[str, ...]
    camera: str
    every: int = 0  # collect setting: a frame every n-th step (0 = unknown)
    episodes_per_seed: int = 0  # collect setting (0 = unknown)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            frames=self.frames,
            targets=self.targets,
            episode=self.episode,
            group=self.group,
            task=self.task,
            tasks=np.array(self.tasks),
            camera=np.array(self.camera),
            every=np.array(self.every),
            episodes_per_seed=np.array(self.episodes_per_seed),
        )

    @classmethod
    def load(cls, path: Path) -> Dataset:
        with np.load(path) as z:
            return cls(
                frames=z["frames"],
                targets=z["targets"],
                episode=z["episode"],
                group=z["group"] if "group" in z else z["episode"],
                task=z["task"],
                tasks=tuple(str(t) for t in z["tasks"]),
                camera=str(z["camera"]),
                every=int(z["every"]) if "every" in z else 0,
                episodes_per_seed=int(z["episodes_per_seed"]) if "episodes_per_seed" in z else 0,
            )


def collect(config: CollectConfig, *, log: bool = True) -> Dataset:
    """Roll out noisy experts and render frames with their pose-feature targets."""
    from metaworld.policies import ENV_POLICY_MAP

    from vlarl.sim.robot import MetaWorldRobot

    rng = np.random.default_rng(config.seed)
    frames: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    episodes: list[int] = []
    groups: list[int] = []
    task_ids: list[int] = []
    index = np.asarray(POSE_FEATURE_INDEX)
    episode_id = 0
    group_id = -1
    start = time.perf_counter()
    with OffscreenRenderer(config.camera) as renderer:
        for t_index, task in enumerate(config.tasks):
            policy = cast(Any, ENV_POLICY_MAP[task])()
            robot: MetaWorldRobot | None = None
            on_robot = 0
            count = 0
            while count < config.frames_per_task:
                if robot is None or on_robot >= config.episodes_per_seed:
                    if robot is not None:
                        robot.close()
                    group_id += 1
                    robot = MetaWorldRobot(
                        task, seed=config.seed + 1000 * t_index + group_id, max_episode_steps=10_000
                    )
                    on_robot = 0
                on_robot += 1
                sigma = float(rng.choice(NOISE_LEVELS))
                # Some episodes keep the gripper state random so open/closed is seen everywhere.
                random_gripper = rng.random() < 0.25
                robot.reset()
                offset = int(rng.integers(config.every))
                for step in range(config.max_steps):
                    if (step + offset) % config.every == 0:
                        frames.append(renderer.render_data(robot.model, robot.data))
                        targets.append(robot.state[index].astype(np.float32))
                        episodes.append(episode_id)
                        groups.append(group_id)
                        task_ids.append(t_index)
                        count += 1
                        if count >= config.frames_per_task:
                            break
                    action = np.asarray(policy.get_action(robot.state), dtype=np.float64)
                    action = action + sigma * rng.standard_normal(4)
                    if random_gripper:
                        action[3] = rng.uniform(-1.0, 1.0)
                    robot.step(np.clip(action, -1.0, 1.0))
                    if robot.done:
                        break
                episode_id += 1
            if robot is not None:
                robot.close()
            if log:
                elapsed = time.perf_counter() - start
                print(f"[collect] {task}: {count} frames, {elapsed:.0f} s so far", flush=True)
    return Dataset(
        frames=np.stack(frames),
        targets=np.stack(targets),
        episode=np.asarray(episodes),
        group=np.asarray(groups),
        task=np.asarray(task_ids),
        tasks=tuple(config.tasks),
        camera=config.camera.camera,
        every=config.every,
        episodes_per_seed=config.episodes_per_seed,
    )


def build_model(n_out: int, *, keypoints: int = 32) -> Any:
    """Conv stack -> spatial soft-argmax keypoints + pooled features -> MLP -> n_out."""
    import torch
    from torch import nn

    class SpatialSoftArgmax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            attention = torch.softmax(x.flatten(2), dim=-1).view(b, c, h, w)
            ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
            ey = (attention.sum(dim=3) * ys).sum(dim=2)
            ex = (attention.sum(dim=2) * xs).sum(dim=2)
            return torch.cat([ex, ey], dim=1)

    class PoseCNN(nn.Module):
        target_mean: torch.Tensor
        target_std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 32, 5, stride=2, padding=2),
                nn.GroupNorm(8, 32),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.GroupNorm(8, 32),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.GroupNorm(8, 64),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, padding=1),
                nn.GroupNorm(8, 64),
                nn.ReLU(),
            )
            self.keypoints = nn.Conv2d(64, keypoints, 1)
            self.soft_argmax = SpatialSoftArgmax()
            self.head = nn.Sequential(
                nn.Linear(2 * keypoints + 64, 256),
                nn.ReLU(),
                nn.Linear(256, 256),
                nn.ReLU(),
                nn.Linear(256, n_out),
            )
            self.register_buffer("target_mean", torch.zeros(n_out))
            self.register_buffer("target_std", torch.ones(n_out))

        def forward_normalized(self, image: torch.Tensor) -> torch.Tensor:
            x = self.trunk(image)
            points = self.soft_argmax(self.keypoints(x))
            pooled = x.mean(dim=(2, 3))
            return self.head(torch.cat([points, pooled], dim=1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.forward_normalized(image) * self.target_std + self.target_mean

    return PoseCNN()


def split_groups(dataset: Dataset, *, held_out: float, seed: int) -> tuple[np.ndarray, ...]:
    """Indices (train, test): whole seed groups are held out, per task, so the test frames
    show object/goal layouts the encoder never saw."""
    rng = np.random.default_rng(seed)
    test_groups: list[int] = []
    for t in np.unique(dataset.task):
        groups = np.unique(dataset.group[dataset.task == t])
        n = min(max(1, round(held_out * len(groups))), len(groups) - 1)
        test_groups.extend(rng.choice(groups, size=n, replace=False).tolist())
    if not test_groups:
        raise ValueError(
            "too few seed groups to hold any out (need >= 2 per task): collect more frames "
            "or lower episodes_per_seed"
        )
    is_test = np.isin(dataset.group, test_groups)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def train(
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    held_out: float = 0.2,
    seed: int = 0,
    threads: int = 1,
    log: bool = True,
) -> tuple[Any, PreprocessConfig, dict[str, float], dict[str, Any]]:
    """Train on the dataset; returns (model, preprocess config, held-out MAE per feature)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    train_idx, test_idx = split_groups(dataset, held_out=held_out, seed=seed)
    mean, std = channel_stats(dataset.frames[train_idx])
    pconfig = PreprocessConfig(
        height=dataset.frames.shape[1],
        width=dataset.frames.shape[2],
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
    )
    pre = Preprocessor(pconfig)
    images = torch.from_numpy(pre.batch(list(dataset.frames)))
    targets = torch.from_numpy(dataset.targets.astype(np.float32))
    t_mean = targets[train_idx].mean(dim=0)
    t_std = targets[train_idx].std(dim=0).clamp_min(1e-3)
    model = build_model(targets.shape[1])
    model.target_mean.copy_(t_mean)
    model.target_std.copy_(t_std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(train_idx) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)
    train_t = torch.from_numpy(train_idx)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = train_t[torch.randperm(len(train_t), generator=gen)]
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = images[idx]
            # Photometric jitter only: pixel geometry is what the targets depend on.
            gain = 1.0 + 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5)
            bias = 0.2 * (torch.rand(len(idx), 3, 1, 1, generator=gen) - 0.5)
            x = x * gain + bias
            y = (targets[idx] - t_mean) / t_std
            loss = torch.nn.functional.smooth_l1_loss(model.forward_normalized(x), y, beta=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        if log and (epoch % 5 == 4 or epoch == epochs - 1):
            mae = evaluate(model, images[test_idx], targets[test_idx])
            print(
                f"[train] epoch {epoch + 1}/{epochs} loss {total / steps_per_epoch:.4f} "
                f"held-out MAE(cm) hand {100 * np.mean(mae[:3]):.2f} obj "
                f"{100 * np.mean(mae[4:7]):.2f} goal {100 * np.mean(mae[7:10]):.2f} "
                f"gripper {mae[3]:.3f}  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    mae = evaluate(model, images[test_idx], targets[test_idx])
    info = {
        "dataset": dataset_summary(dataset),
        "mean_baseline_mae": mean_baseline(dataset, held_out=held_out, seed=seed),
        "train_frames": len(train_idx),
        "test_frames": len(test_idx),
        "test_episodes": len(np.unique(dataset.episode[test_idx])),
        "test_layout_groups": len(np.unique(dataset.group[test_idx])),
        "train_seconds": round(time.perf_counter() - start, 1),
        "test_mae_by_task": {
            task: dict(
                zip(
                    POSE_FEATURE_NAMES,
                    evaluate(
                        model,
                        images[test_idx[dataset.task[test_idx] == t]],
                        targets[test_idx[dataset.task[test_idx] == t]],
                    ).tolist(),
                    strict=True,
                )
            )
            for t, task in enumerate(dataset.tasks)
        },
    }
    return model, pconfig, dict(zip(POSE_FEATURE_NAMES, mae.tolist(), strict=True)), info


def dataset_summary(dataset: Dataset) -> dict[str, Any]:
    return {
        "frames": len(dataset.frames),
        "episodes": len(np.unique(dataset.episode)),
        "layout_groups": len(np.unique(dataset.group)),
        "tasks": list(dataset.tasks),
        "camera": dataset.camera,
        "frame_size": [int(dataset.frames.shape[2]), int(dataset.frames.shape[1])],
        "every": dataset.every,
        "episodes_per_seed": dataset.episodes_per_seed,
    }


def mean_baseline(dataset: Dataset, *, held_out: float, seed: int) -> dict[str, float]:
    """Held-out MAE of always answering the training mean: what 'learned nothing' scores."""
    train_idx, test_idx = split_groups(dataset, held_out=held_out, seed=seed)
    mean = dataset.targets[train_idx].mean(axis=0)
    error = np.abs(dataset.targets[test_idx] - mean).mean(axis=0)
    return dict(zip(POSE_FEATURE_NAMES, error.astype(float).tolist(), strict=True))


CARD_COMMAND = (
    "python -m vlarl.perception.train_encoder --out models/image_encoder.onnx "
    "--cache data/encoder_frames.npz --version {version}"
)


FRESH_SEED = 700_000  # robot seeds of the fresh check: far from the training seeds


def fresh_check(encoder: ImageEncoder, *, frames_per_task: int = 60) -> dict[str, Any]:
    """MAE on newly rendered frames from robot seeds no training run uses."""
    config = CollectConfig(frames_per_task=frames_per_task, episodes_per_seed=3, seed=FRESH_SEED)
    fresh = collect(config, log=False)
    error = np.abs(encoder.encode_frames(fresh.frames) - fresh.targets).mean(axis=0)
    return {
        "frames": len(fresh.frames),
        "episodes": len(np.unique(fresh.episode)),
        "mae": dict(zip(POSE_FEATURE_NAMES, error.astype(float).tolist(), strict=True)),
    }


def card_markdown(report: dict[str, Any], meta: EncoderMetadata) -> str:
    """The model card (models/image_encoder.md) for a training report."""
    data = report["dataset"]
    mae, base = report["held_out_mae"], report["mean_baseline_mae"]

    def cm(name: str, value: float) -> str:
        return f"{value:.3f}" if name == "gripper" else f"{100 * value:.2f} cm"

    fresh = report.get("fresh_check")
    rows = [
        f"| {n} | {cm(n, mae[n])} | {cm(n, base[n])} | "
        + (f"{cm(n, fresh['mae'][n])} | " if fresh else "")
        + " | ".join(cm(n, report["test_mae_by_task"][t][n]) for t in data["tasks"])
        + " |"
        for n in meta.feature_names
    ]
    header = (
        "| feature | held-out MAE | mean-baseline MAE | "
        + ("fresh-seed MAE | " if fresh else "")
        + " | ".join(data["tasks"])
        + " |"
    )
    goal = [n for n in meta.feature_names if n.startswith("goal_")]
    goal_ratio = sum(mae[n] for n in goal) / max(1e-9, sum(base[n] for n in goal))
    goal_note = (
        f"The goal is a small dot (2-3 px at 84x84): the goal error is {100 * goal_ratio:.0f} % "
        "of the mean baseline's"
        + (
            ", little better than not looking, so image-based policies should not rely on the "
            "goal estimate."
            if goal_ratio > 0.7
            else "."
        )
    )
    rule = "|---" * (3 + (1 if fresh else 0) + len(data["tasks"])) + "|"
    every = data.get("every")
    per_seed = data.get("episodes_per_seed")
    sampling = f"a frame every {every} steps" if every else "frames along each episode"
    seeds = f"every {per_seed} episodes" if per_seed else "every few episodes"
    paragraphs = [
        f"# Image encoder `{meta.tag}`",
        f"A learned pose estimator for the embedded robot: one RGB frame of Meta-World's "
        f"`{meta.camera}` camera ({meta.frame_width}x{meta.frame_height}) in, "
        f"{meta.feature_dim} pose features in metres out ({', '.join(meta.feature_names)}). "
        "The `perception` node runs it with `source: image` and appends proprioception. The "
        f"contract (input `image` [B, 3, {meta.input_height}, {meta.input_width}] float32, "
        f"output `features` [B, {meta.feature_dim}], `vlarl.encoder.*` metadata including the "
        "preprocessing) is in `src/vlarl/perception/encoder.py`.",
        "## Rebuild",
        "    " + CARD_COMMAND.format(version=meta.version),
        f"Renders {data['frames']} frames (80-300 ms each on CPU with `MUJOCO_GL=osmesa`, about "
        "15 min on a loaded 2-core machine; `--cache` keeps them for re-training), trains "
        f"{report['train_seconds']:.0f} s on one CPU thread, exports ONNX (max |ONNX - PyTorch| "
        f"= {report['onnx_vs_torch_max_abs']:.1e}), re-loads it through the encoder contract and "
        "writes this card and `image_encoder.json` (the full report).",
        "## Data",
        f"Scripted experts (`metaworld.policies`) of {', '.join(data['tasks'])} with Gaussian "
        "action noise (sigma 0, 0.3, 0.6 or 1.0 per episode; a quarter of the episodes with a "
        f"random gripper command), {sampling}: {data['frames']} frames from {data['episodes']} "
        f"episodes. The robot seed (and with it the task's set of 50 object/goal layouts) changes "
        f"{seeds} ({data['layout_groups']} seed groups). Held out: whole seed groups (20 % per "
        f"task; {report['test_frames']} frames from {report['test_layout_groups']} groups), i.e. "
        "layouts the encoder never saw.",
        "## Model",
        "Conv stack (4 conv layers with GroupNorm and ReLU, 84x84 -> 21x21x64) -> 32 spatial "
        f"soft-argmax keypoints + pooled features -> MLP 256-256 -> {meta.feature_dim} outputs, "
        "target normalization inside the graph. Smooth-L1 loss on normalized targets, AdamW with "
        "a one-cycle learning rate, photometric jitter only (no geometric augmentation: the "
        "targets depend on pixel geometry). Input normalization: per-channel mean/std of the "
        "training frames (in the metadata).",
        "## Held-out error (unseen layouts)",
        "Mean absolute error on the held-out groups, overall and per task. The mean baseline "
        "always answers the training mean (what an encoder that learned nothing scores). "
        + (
            f"Fresh seeds: {fresh['frames']} frames of {fresh['episodes']} episodes rendered after "
            f"training from robot seeds >= {FRESH_SEED}, which no training run uses. "
            if fresh
            else ""
        )
        + "The gripper is the opening in [0, 1].",
        "\n".join([header, rule, *rows]),
        "## Limits",
        "\n".join(
            [
                f"- One fixed camera (`{meta.camera}`) and frame size; the perception node drops "
                "frames from another camera or size (`check_camera`).",
                f"- Trained on {', '.join(data['tasks'])} only; other tasks' objects are out of "
                "distribution.",
                f"- {goal_note}",
                "- The gripper opening is a few pixels of finger; its estimate is coarse "
                "(proprioception carries it exactly).",
            ]
        ),
    ]
    return "\n\n".join(paragraphs) + "\n"


def evaluate(model: Any, images: Any, targets: Any) -> np.ndarray:
    """Mean absolute error per feature (physical units)."""
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
    return (pred - targets).abs().mean(dim=0).numpy()


def export(
    model: Any,
    path: Path,
    *,
    pconfig: PreprocessConfig,
    dataset: Dataset,
    mae: dict[str, float],
    version: int,
) -> EncoderMetadata:
    """Write the ONNX file with the encoder contract's metadata; returns the metadata."""
    import onnx
    import torch

    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, pconfig.height, pconfig.width)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[INPUT_IMAGE],
        output_names=[OUTPUT_FEATURES],
        dynamic_axes={INPUT_IMAGE: {0: "batch"}, OUTPUT_FEATURES: {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    meta = EncoderMetadata(
        model_id="metaworld-pose-cnn",
        version=version,
        feature_names=POSE_FEATURE_NAMES,
        input_height=pconfig.height,
        input_width=pconfig.width,
        crop=pconfig.crop,
        mean=pconfig.mean,
        std=pconfig.std,
        camera=dataset.camera,
        frame_height=int(dataset.frames.shape[1]),
        frame_width=int(dataset.frames.shape[2]),
        tasks=dataset.tasks,
        held_out_mae={k: round(v, 5) for k, v in mae.items()},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/image_encoder.onnx"))
    parser.add_argument("--cache", type=Path, default=None, help="npz of rendered frames")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--frames-per-task", type=int, default=1000)
    parser.add_argument("--episodes-per-seed", type=int, default=10)
    parser.add_argument("--camera", default=DEFAULT_CAMERA)
    parser.add_argument("--size", type=int, default=84, help="frame width and height")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument(
        "--fresh-frames-per-task", type=int, default=60, help="frames of the fresh-seed check"
    )
    args = parser.parse_args(argv)

    if args.cache is not None and args.cache.is_file():
        dataset = Dataset.load(args.cache)
        print(f"[collect] loaded {len(dataset.frames)} frames from {args.cache}", flush=True)
    else:
        dataset = collect(
            CollectConfig(
                tasks=tuple(args.tasks),
                frames_per_task=args.frames_per_task,
                episodes_per_seed=args.episodes_per_seed,
                seed=args.seed,
                camera=CameraConfig(camera=args.camera, width=args.size, height=args.size),
            )
        )
        if args.cache is not None:
            dataset.save(args.cache)
    model, pconfig, mae, info = train(
        dataset, epochs=args.epochs, seed=args.seed, threads=args.threads
    )
    meta = export(model, args.out, pconfig=pconfig, dataset=dataset, mae=mae, version=args.version)

    # The file must load through the contract and agree with PyTorch.
    import torch

    encoder = ImageEncoder(args.out)
    sample = dataset.frames[:16]
    with torch.no_grad():
        reference = model(torch.from_numpy(Preprocessor(pconfig).batch(list(sample)))).numpy()
    onnx_out = encoder.encode_frames(sample)
    gap = float(np.abs(onnx_out - reference).max())
    if gap > 1e-3:
        raise SystemExit(f"ONNX and PyTorch outputs differ by {gap}")
    report = {"encoder": meta.tag, "held_out_mae": mae, "onnx_vs_torch_max_abs": gap, **info}
    report["fresh_check"] = fresh_check(encoder, frames_per_task=args.fresh_frames_per_task)
    print(json.dumps(report, indent=2), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(card_markdown(report, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
