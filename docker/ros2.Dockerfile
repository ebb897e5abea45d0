# vlarl on a ROS 2 Kilted install (Ubuntu Noble, Python 3.12): rosdep installs the ROS and
# Debian packages package.xml names, a virtual environment holds the pinned Python packages
# Debian does not ship, colcon builds the package, ros2 launch runs it.
#   docker build -f docker/ros2.Dockerfile -t vlarl-ros2 .
#   docker run --rm vlarl-ros2
#   docker run --rm vlarl-ros2 bash -c '. /opt/ros/kilted/setup.bash && . install/setup.bash \
#     && python3 "$(command -v ros2)" launch vlarl bringup.launch.py learn:=true action_offset:=0,0.2,0,0'
FROM ros:kilted-ros-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# libosmesa6: MuJoCo's CPU renderer (MUJOCO_GL=osmesa). python3-venv: the environment below.
# Debian's current security updates rather than frozen versions.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends libosmesa6 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vlarl
COPY package.xml requirements.txt ./
# rosdep: the ROS packages (rclpy, messages, launch_ros, rviz2, ...) and the Debian Python
# packages (numpy, yaml, opencv, ...) from package.xml. Skipped: the *-pip keys, because rosdep
# would pip-install them into the system Python, which Noble refuses (PEP 668,
# externally-managed-environment), and python3-torch (Debian's older build): the virtual
# environment below installs those, at requirements.txt's pins.
RUN apt-get update -qq \
    && rosdep update --rosdistro "$ROS_DISTRO" \
    && rosdep install -y --rosdistro "$ROS_DISTRO" --from-paths . --ignore-src \
       --skip-keys "python3-torch $(grep -oP '(?<=<exec_depend>)python3-[a-z0-9-]+-pip' package.xml | tr '\n' ' ')" \
    && rm -rf /var/lib/apt/lists/*
# A virtual environment that also sees the system packages (rclpy comes from /opt/ros via
# PYTHONPATH; Debian's numpy and PyYAML stay untouched). `pip install` over Debian's numpy or
# PyYAML in the system Python would stop the build on Noble: pip may not modify packages that
# dpkg owns. Inside the venv, pip installs its own pinned numpy/PyYAML next to Debian's
# ("not uninstalling ... outside environment") and they take precedence in the venv.
# The ros-* wheels are left out: ROS comes from the install above. torch: the CPU build from
# PyTorch's CPU index (plain PyPI's is the CUDA build, several GB).
ENV VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && python3 -m pip install --no-cache-dir -q \
       --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
    && grep -v '^ros-' requirements.txt | python3 -m pip install --no-cache-dir -q -r /dev/stdin
COPY . .
# colcon run by the venv's Python, so the node executables' shebang is the venv's Python and
# they find torch, mujoco and onnxruntime (colcon itself comes from the system packages).
WORKDIR /opt/vlarl/ros2_ws
RUN . "/opt/ros/$ROS_DISTRO/setup.bash" && python3 -m colcon build --symlink-install
ENV ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST MUJOCO_GL=osmesa
# The launch file imports vlarl (it checks the model and the task before any node starts), so
# ros2 runs under the venv's Python rather than its /usr/bin/python3 shebang.
CMD ["bash", "-c", ". /opt/ros/kilted/setup.bash && . install/setup.bash && python3 \"$(command -v ros2)\" launch vlarl bringup.launch.py"]
