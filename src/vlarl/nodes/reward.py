"""reward node: robot status (+ observations) -> reward, success, value, episode boundaries.

A thin ROS adapter over :class:`vlarl.core.reward.EpisodeAccountant`:

- subscribes ``robot/status`` (JointState name/position = ROBOT_STATUS_FIELDS) and publishes one
  ``reward`` message per status sample (JointState name/position = REWARD_FIELDS, stamp = the
  status stamp, i.e. the state after the step);
- publishes ``reward/episode`` (std_msgs/String JSON: episode, task, success, steps, return,
  success_source, ...) once per finished episode; missed samples are tolerated (a new episode
  number ends the previous episode);
- the task name is the ``frame_id`` of ``robot/task_state`` (read at 2 Hz from the latest raw
  message, so the 39-d state is not deserialized at control rate), or the ``task`` parameter;
- ``success_source`` (swappable at run time, validated): ``sim`` (the simulator's flag),
  ``human`` (the ``reward/label`` std_srvs/SetBool service: true = success, false = failure;
  the label ends the episode in progress at its next status sample) or ``detector`` (the
  learned success detector ``detector_model``; refused, with the reason, while no detector
  loads);
- learned models (``detector_model``, ``progress_model``: ONNX files, relative paths against the
  cwd then the package) read ``observation``: each status sample is paired with the observation
  of the same stamp (it waits up to ``observation_timeout_s`` for it; without an observation
  stream nothing waits). ``value`` of every reward message = the progress model's -d(o) (0.0
  without one); ``reward_scheme: progress`` adds its dense reward d(o_t) - d(o_t+1);
- every label the service receives is published on ``reward/human_label`` (std_msgs/String JSON:
  stamp, episode, label, success, task, applied, success_source) so it lands in the bag;
- ``reset_service`` (e.g. ``sim_robot/reset``): called when this node ends an episode on its own
  decision (detector success with ``terminate_on_success``, a human label), so the robot starts
  the next one; empty = nobody is asked.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, cast  # noqa: E402

import numpy as np  # noqa: E402
from rclpy.clock import Clock, ClockType  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from vlarl import topics  # noqa: E402
from vlarl.core.reward import (  # noqa: E402
    REWARD_SCHEMES,
    SUCCESS_SOURCES,
    ConstantValue,
    DetectorSuccess,
    EpisodeAccountant,
    EpisodeSummary,
    LabelRefused,
    ObservationJoin,
    ProgressValue,
    StatusSample,
    make_success_source,
    success_source_problem,
)
from vlarl.graph import resolve_model_path  # noqa: E402
from vlarl.ros.msgs import MessageError, fields_from_msg, stamp_to_ns  # noqa: E402
from vlarl.ros.params import Param, declare  # noqa: E402

CONTROL_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.RELIABLE
)
TASK_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
)

PARAMS: tuple[Param, ...] = (
    Param("success_source", "sim", "who decides success: sim (simulator flag), human (the "
          "reward/label service), detector (the learned detector_model)",
          choices=SUCCESS_SOURCES),
    Param("reward_scheme", "sparse", "sparse: 1.0 on the success step, else 0.0; env: "
          "Meta-World's shaped reward; progress: progress_weight * (d(o_t) - d(o_t+1)) + "
          "success_weight * sparse (needs progress_model)", choices=REWARD_SCHEMES),
    Param("terminate_on_success", True, "an episode ends (terminal) at its first success"),
    Param("task", "", "task name for the summaries and the learned models when "
          "robot/task_state is not published"),
    Param("detector_model", "", "success-detector ONNX file ('' = none); setting it loads, "
          "verifies and swaps it in, or refuses with the reason"),
    Param("detector_threshold", 0.0, "firing threshold of the detector (0 = the model's own)",
          low=0.0, high=0.999),
    Param("detector_debounce", 0, "consecutive positive windows before the detector fires "
          "(0 = the model's own)", low=0, high=1000),
    Param("progress_model", "", "progress (steps-to-go) ONNX file ('' = none): value = -d(o)"),
    Param("progress_weight", 0.01, "reward per step of progress (d drops by 1), scheme "
          "progress", low=0.0, high=100.0),
    Param("success_weight", 1.0, "reward on the success step, scheme progress", low=0.0,
          high=1000.0),
    Param("observation_timeout_s", 0.5, "how long a status sample waits for its observation "
          "(learned models only)", low=0.0, high=10.0),
    Param("label_timeout_s", 1.0, "a human label ends its episode at the next status sample, "
          "or after this long without one", low=0.0, high=60.0),
    Param("reset_service", "", "std_srvs/Trigger called when this node ends an episode on its "
          "own decision (e.g. sim_robot/reset); '' = none"),
)  # fmt: skip


class RewardNode(Node):
    """ROS adapter of the episode accountant (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("reward", **kwargs)
        self._params = declare(self, PARAMS, self._on_param_change)
        p = self._params
        self.malformed = 0
        self.samples = 0
        self.obs_mismatch = 0
        self.labels = 0
        self._task = p["task"]
        self._task_raw: bytes | None = None
        self._task_raw_read: bytes | None = None
        self._detector: Any = None
        self._progress: Any = None
        self._label_since: float | None = None
        self._last_status_ns = 0
        self._reset_client: Any = None
        self._errors_seen: dict[int, int] = {}

        if p["detector_model"]:
            try:
                self._detector = self._load_detector(p)
            except ValueError as exc:
                self.get_logger().error(f"no success detector: {exc}")
        if p["progress_model"]:
            try:
                self._progress = self._load_progress(p["progress_model"])
            except ValueError as exc:
                self.get_logger().error(f"no progress model: {exc}")
        problem = success_source_problem(p["success_source"], detector=self._detector)
        if problem is None:
            problem = self._scheme_problem(p["reward_scheme"], self._progress)
        if problem is not None:
            raise ValueError(problem)
        self.accountant = EpisodeAccountant(
            scheme=p["reward_scheme"],
            success_source=make_success_source(p["success_source"], detector=self._detector),
            value_source=ProgressValue(self._progress) if self._progress else ConstantValue(0.0),
            terminate_on_success=p["terminate_on_success"],
            progress_weight=p["progress_weight"],
            success_weight=p["success_weight"],
        )
        self._join = ObservationJoin(timeout_ns=int(p["observation_timeout_s"] * 1e9))

        self._reward_pub = self.create_publisher(JointState, topics.REWARD, CONTROL_QOS)
        self._episode_pub = self.create_publisher(String, topics.EPISODE, 50)
        self._label_pub = self.create_publisher(String, topics.HUMAN_LABEL, 50)
        self.create_subscription(JointState, topics.ROBOT_STATUS, self._on_status, CONTROL_QOS)
        self.create_subscription(
            JointState, topics.OBSERVATION, self._on_observation, CONTROL_QOS, raw=True
        )
        self.create_subscription(
            JointState, topics.TASK_STATE, self._on_task_state, TASK_QOS, raw=True
        )
        self.create_service(SetBool, topics.REWARD_LABEL, self._on_label)
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(0.5, self._refresh_task, clock=steady)
        self.create_timer(0.02, self._on_tick, clock=steady)
        self._reward = JointState()
        self._reward.name = list(topics.REWARD_FIELDS)
        self.get_logger().info(
            f"reward up: success_source={p['success_source']} scheme={p['reward_scheme']} "
            f"terminate_on_success={p['terminate_on_success']} detector="
            f"{self._detector.tag if self._detector else 'none'} progress="
            f"{self._progress.tag if self._progress else 'none'}"
        )

    # ----------------------------------------------------------------- models
    @property
    def _learning(self) -> bool:
        return self._progress is not None or isinstance(
            self.accountant.success_source, DetectorSuccess
        )

    def _load_detector(self, p: dict[str, Any], path: str | None = None) -> Any:
        from vlarl.rewardmodels.detector import SuccessDetector
        from vlarl.rewardmodels.errors import RewardModelError

        try:
            return SuccessDetector.load(
                resolve_model_path(str(p["detector_model"] if path is None else path)),
                threshold=p["detector_threshold"] or None,
                debounce=p["detector_debounce"] or None,
            )
        except RewardModelError as exc:
            raise ValueError(f"detector_model refused: {exc}") from None

    def _load_progress(self, path: str) -> Any:
        from vlarl.rewardmodels.errors import RewardModelError
        from vlarl.rewardmodels.progress import ProgressModel

        try:
            return ProgressModel.load(resolve_model_path(path))
        except RewardModelError as exc:
            raise ValueError(f"progress_model refused: {exc}") from None

    @staticmethod
    def _scheme_problem(scheme: str, progress: Any) -> str | None:
        if scheme == "progress" and progress is None:
            return "reward_scheme 'progress' needs a progress model: set progress_model"
        return None

    def _on_param_change(self, accepted: dict[str, Any]) -> str | None:
        """Validate the change as a whole, then apply it; a refusal changes nothing."""
        p = {**self._params, **accepted}
        detector, progress = self._detector, self._progress
        try:
            if {"detector_model", "detector_threshold", "detector_debounce"} & accepted.keys():
                detector = self._load_detector(p) if p["detector_model"] else None
            if "progress_model" in accepted:
                progress = self._load_progress(p["progress_model"]) if p["progress_model"] else None
        except ValueError as exc:
            return str(exc)
        problem = success_source_problem(p["success_source"], detector=detector)
        if problem is None:
            problem = self._scheme_problem(p["reward_scheme"], progress)
        if problem is not None:
            return problem
        acc = self.accountant
        if detector is not self._detector or "success_source" in accepted:
            acc.success_source = make_success_source(p["success_source"], detector=detector)
        if progress is not self._progress:
            acc.value_source = ProgressValue(progress) if progress else ConstantValue(0.0)
        self._detector, self._progress = detector, progress
        acc.scheme = p["reward_scheme"]
        acc.terminate_on_success = bool(p["terminate_on_success"])
        acc.progress_weight = float(p["progress_weight"])
        acc.success_weight = float(p["success_weight"])
        if "observation_timeout_s" in accepted:
            self._join.timeout_ns = int(p["observation_timeout_s"] * 1e9)
        if accepted.get("task"):
            self._task = accepted["task"]
        changed = ", ".join(f"{k}={v}" for k, v in accepted.items())
        self.get_logger().info(f"parameters changed: {changed}")
        return None

    # ----------------------------------------------------------------- callbacks
    def _on_task_state(self, data: bytes) -> None:
        self._task_raw = data  # decoded at 2 Hz by _refresh_task

    def _refresh_task(self) -> None:
        raw = self._task_raw
        if raw is None or raw is self._task_raw_read:
            return
        self._task_raw_read = raw
        try:
            name = deserialize_message(raw, JointState).header.frame_id
        except Exception:
            return
        if name:
            self._task = name

    def _on_observation(self, data: bytes) -> None:
        if not self._learning:
            return
        try:
            msg = deserialize_message(data, JointState)
            obs = np.asarray(msg.position, dtype=np.float32)
        except Exception:
            self.malformed += 1
            return
        if not np.isfinite(obs).all():
            self.malformed += 1
            return
        dims = {m.metadata.obs_dim for m in (self._detector, self._progress) if m is not None}
        if dims and obs.shape[0] not in dims:  # e.g. image features for state-trained models
            self.obs_mismatch += 1
            if self.obs_mismatch == 1 or self.obs_mismatch % 1000 == 0:
                self.get_logger().warning(
                    f"observation has {obs.shape[0]} numbers, the learned models take "
                    f"{sorted(dims)}: ignored ({self.obs_mismatch} so far)"
                )
            return  # not part of the stream the learned models read: nothing waits for it
        self._join.add_observation(stamp_to_ns(msg.header.stamp), obs, time.monotonic_ns())
        self._drain()

    def _on_status(self, msg: JointState) -> None:
        try:
            sample = StatusSample.from_fields(fields_from_msg(msg, topics.ROBOT_STATUS_FIELDS))
        except (MessageError, ValueError) as exc:
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 100 == 0:
                self.get_logger().warning(f"dropped malformed status ({self.malformed}): {exc}")
            return
        self.samples += 1
        if not self._task and self._task_raw is not None:
            self._refresh_task()  # first samples: do not wait for the 2 Hz refresh
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if not self._learning and not len(self._join):
            self._account(sample, stamp_ns, msg, None)
            return
        self._join.add_status(stamp_ns, (sample, stamp_ns, msg), time.monotonic_ns())
        self._drain()

    def _on_tick(self) -> None:
        if len(self._join):
            self._drain()
        if self._label_since is not None:
            timeout = self._params["label_timeout_s"]
            if time.monotonic() - self._label_since >= timeout:
                self._label_since = None
                summary = self.accountant.expire_label()
                if summary is not None:
                    self._publish_episode(summary)
                    self._request_reset(summary)

    def _drain(self) -> None:
        for item, obs in self._join.ready(time.monotonic_ns()):
            sample, stamp_ns, msg = cast(tuple[StatusSample, int, JointState], item)
            self._account(sample, stamp_ns, msg, obs)

    def _account(
        self, sample: StatusSample, stamp_ns: int, msg: JointState, obs: np.ndarray | None
    ) -> None:
        if obs is not None:
            dims = {m.metadata.obs_dim for m in (self._detector, self._progress) if m is not None}
            if dims and obs.shape[0] not in dims:  # the models changed while it waited
                obs = None
        self._last_status_ns = stamp_ns
        out, finished = self.accountant.update(sample, task=self._task, stamp_ns=stamp_ns, obs=obs)
        if obs is not None:
            self._report_model_errors()
        if out is not None:
            reward = self._reward
            reward.header.stamp = msg.header.stamp
            reward.position = out.values()
            self._reward_pub.publish(reward)
        for summary in finished:
            if summary.end == "label":
                self._label_since = None
            self._publish_episode(summary)
            self._request_reset(summary)

    def _report_model_errors(self) -> None:
        """A learned model that refuses its inputs (unknown task, ...) fails closed; say so
        (first time and every 1000th)."""
        for source in (self.accountant.success_source, self.accountant.value_source):
            errors = getattr(source, "errors", 0)
            if errors and errors != self._errors_seen.get(id(source)):
                self._errors_seen[id(source)] = errors
                if errors == 1 or errors % 1000 == 0:
                    self.get_logger().warning(
                        f"{type(source).__name__}: {getattr(source, 'last_error', '')} "
                        f"({errors} so far; nothing is decided from these observations)"
                    )

    def _on_label(self, request: Any, response: Any) -> Any:
        success = bool(request.data)
        source = self.accountant.success_source.name
        episode = self.accountant.episode
        applied = False
        message = ""
        if source == "human":
            try:
                episode = self.accountant.label(success)
                applied = True
                self._label_since = time.monotonic()
                message = (
                    f"episode {episode} ends as a {'success' if success else 'failure'} "
                    "at its next sample"
                )
            except LabelRefused as exc:
                message = str(exc)
        else:
            message = (
                f"label recorded; success_source is {source!r}, so it does not end the "
                "episode (set success_source to 'human' for that)"
            )
        self.labels += 1
        record = {
            "stamp": self._last_status_ns,
            "episode": episode,
            "label": "success" if success else "failure",
            "success": success,
            "task": self._task,
            "applied": applied,
            "success_source": source,
        }
        self._label_pub.publish(String(data=json.dumps(record)))
        self.get_logger().info(f"human label {record['label']}: {message}")
        response.success = applied or source != "human"
        response.message = message
        return response

    def _request_reset(self, summary: EpisodeSummary) -> None:
        """Ask the robot for the next episode when this node, not the robot, ended this one."""
        name = self._params["reset_service"]
        if not name or summary.end not in ("success", "label"):
            return
        if self._reset_client is None or self._reset_client.srv_name != name:
            self._reset_client = self.create_client(Trigger, name)
        if not self._reset_client.service_is_ready():
            self.get_logger().warning(f"reset service {name} is not available")
            return
        self._reset_client.call_async(Trigger.Request())

    def _publish_episode(self, summary: EpisodeSummary) -> None:
        self._episode_pub.publish(String(data=summary.to_json()))
        self.get_logger().info(
            f"episode {summary.episode} ({summary.task or 'unknown task'}): "
            f"{'success' if summary.success else 'failure'} in {summary.steps} steps, "
            f"return {summary.episode_return:g}, end {summary.end}, "
            f"source {summary.success_source}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    from vlarl.ros.executors import run_node

    return run_node(RewardNode, name="reward", argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
