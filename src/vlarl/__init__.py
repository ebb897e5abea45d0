"""vlarl: a ROS 2 stack with which a robot improves its own policy while it works."""

__version__ = "0.1.0"
