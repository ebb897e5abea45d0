# vlarl on a ROS 2 Kilted install: colcon build + ros2 launch.
#   docker build -f docker/ros2.Dockerfile -t vlarl-ros2 .
#   docker run --rm vlarl-ros2 ros2 launch vlarl bringup.launch.py
FROM ros:kilted-ros-base
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      libosmesa6 python3-pip python3-venv ros-kilted-rviz2 ros-kilted-robot-state-publisher \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vlarl
COPY . .
# Python-only dependencies (the ROS ones come from the ROS install).
RUN pip3 install --break-system-packages torch==2.13.0 \
    && grep -v '^ros-' requirements.txt | pip3 install --break-system-packages -r /dev/stdin
RUN . /opt/ros/kilted/setup.sh && cd ros2_ws && colcon build --symlink-install
ENV ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST MUJOCO_GL=osmesa
CMD ["bash", "-c", ". /opt/ros/kilted/setup.sh && . ros2_ws/install/setup.sh && ros2 launch vlarl bringup.launch.py"]
