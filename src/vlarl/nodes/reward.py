"""reward node: robot status -> reward, success, value, episode boundaries and summaries.

A thin ROS adapter over :class:`vlarl.core.reward.EpisodeAccountant`:

- subscribes ``robot/status`` (JointState name/position = ROBOT_STATUS_FIELDS) and publishes one
  ``reward`` message per status sample (JointState name/position = REWARD_FIELDS, stamp = the
  status stamp, i.e. the state after the step);
- publishes ``reward/episode`` (std_msgs/String JSON: episode, task, success, steps, return,
  success_source, ...) once per finished episode; missed samples are tolerated (a new episode
  number ends the previous episode);
- the task name is the ``frame_id`` of ``robot/task_state`` (read at 2 Hz from the latest raw
  message, so the 39-d state is not deserialized at control rate), or the ``task`` parameter;
- ``success_source``: ``sim`` (the simulator's flag) is implemented; ``human`` and ``detector``
  are refused with the reason until they exist; ``reward_scheme``: ``sparse`` or ``env``.
"""

from __future__ import annotations

from vlarl.rosenv import ensure_local_discovery

ensure_local_discovery()  # before rclpy is imported anywhere in this process

import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from rclpy.clock import Clock, ClockType  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from vlarl import topics  # noqa: E402
from vlarl.core.reward import (  # noqa: E402
    REWARD_SCHEMES,
    SUCCESS_SOURCES,
    EpisodeAccountant,
    EpisodeSummary,
    StatusSample,
    make_success_source,
    success_source_problem,
)
from vlarl.ros.msgs import MessageError, fields_from_msg, stamp_to_ns  # noqa: E402
from vlarl.ros.params import Param, declare  # noqa: E402

CONTROL_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.RELIABLE
)
TASK_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT
)

PARAMS: tuple[Param, ...] = (
    Param("success_source", "sim", "who decides success: sim (simulator flag); human and "
          "detector are refused until implemented", choices=SUCCESS_SOURCES),
    Param("reward_scheme", "sparse", "sparse: 1.0 on the success step, else 0.0; env: "
          "Meta-World's shaped reward", choices=REWARD_SCHEMES),
    Param("terminate_on_success", True, "an episode ends (terminal) at its first success"),
    Param("task", "", "task name for the summaries when robot/task_state is not published"),
)  # fmt: skip


class RewardNode(Node):
    """ROS adapter of the episode accountant (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("reward", **kwargs)
        self._params = declare(self, PARAMS, self._on_param_change)
        p = self._params
        problem = success_source_problem(p["success_source"])
        if problem is not None:
            raise ValueError(problem)
        self.accountant = EpisodeAccountant(
            scheme=p["reward_scheme"],
            success_source=make_success_source(p["success_source"]),
            terminate_on_success=p["terminate_on_success"],
        )
        self.malformed = 0
        self.samples = 0
        self._task = p["task"]
        self._task_raw: bytes | None = None
        self._task_raw_read: bytes | None = None

        self._reward_pub = self.create_publisher(JointState, topics.REWARD, CONTROL_QOS)
        self._episode_pub = self.create_publisher(String, topics.EPISODE, 50)
        self.create_subscription(JointState, topics.ROBOT_STATUS, self._on_status, CONTROL_QOS)
        self.create_subscription(
            JointState, topics.TASK_STATE, self._on_task_state, TASK_QOS, raw=True
        )
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(0.5, self._refresh_task, clock=steady)
        self._reward = JointState()
        self._reward.name = list(topics.REWARD_FIELDS)
        self.get_logger().info(
            f"reward up: success_source={p['success_source']} scheme={p['reward_scheme']} "
            f"terminate_on_success={p['terminate_on_success']}"
        )

    def _on_param_change(self, accepted: dict[str, Any]) -> str | None:
        if "success_source" in accepted:
            problem = success_source_problem(accepted["success_source"])
            if problem is not None:
                return problem
            self.accountant.success_source = make_success_source(accepted["success_source"])
        if "reward_scheme" in accepted:
            self.accountant.scheme = accepted["reward_scheme"]
        if "terminate_on_success" in accepted:
            self.accountant.terminate_on_success = bool(accepted["terminate_on_success"])
        if accepted.get("task"):
            self._task = accepted["task"]
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
        out, finished = self.accountant.update(
            sample, task=self._task, stamp_ns=stamp_to_ns(msg.header.stamp)
        )
        for summary in finished:
            self._publish_episode(summary)
        if out is None:
            return
        reward = self._reward
        reward.header.stamp = msg.header.stamp
        reward.position = out.values()
        self._reward_pub.publish(reward)

    def _publish_episode(self, summary: EpisodeSummary) -> None:
        self._episode_pub.publish(String(data=summary.to_json()))
        self.get_logger().info(
            f"episode {summary.episode} ({summary.task or 'unknown task'}): "
            f"{'success' if summary.success else 'failure'} in {summary.steps} steps, "
            f"return {summary.episode_return:g}, end {summary.end}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ensure_local_discovery()
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=list(sys.argv if argv is None else argv))
    node: RewardNode | None = None
    try:
        try:
            node = RewardNode()
        except ValueError as exc:
            print(f"reward: {exc}", file=sys.stderr)
            return 2
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
