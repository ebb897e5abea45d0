"""Rewards without a simulator: a learned success detector and a steps-to-go progress model.

ROS-free. :mod:`.labels` turns replay episodes into training targets (WMPO's success-detector
rule; steps-to-go), :mod:`.detector` and :mod:`.progress` train, export (ONNX with metadata) and
run the two models, :mod:`.episodes` generates labelled episodes with near-misses from Meta-World's
scripted experts, :mod:`.evaluation` measures them on held-out episodes. The reward node and the
learner (offline, on replay data: :func:`.labels.relabel_rewards`) call the same runtime classes;
an RL loop that steps the simulator in-process uses :class:`.online.LearnedReward` (the reward
node's rule, without ROS).
"""
