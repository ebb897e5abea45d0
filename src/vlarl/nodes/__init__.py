"""ROS 2 nodes of the graph: thin adapters over the ROS-free packages."""
