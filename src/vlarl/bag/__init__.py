"""rosbag2 recording and reading without ROS: split mcap/sqlite3 bags through ``rosbags``."""
