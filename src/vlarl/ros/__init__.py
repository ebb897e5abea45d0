"""Thin ROS 2 helpers shared by the nodes (the only modules besides nodes/ that import rclpy)."""
