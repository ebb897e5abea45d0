"""The embedded robot: a Meta-World task stepped, reset and rendered without ROS."""
