"""``nexedge demo``: the whole product end to end on synthetic data, on a CPU, in minutes.

``run`` drives the stages and prints the recap; ``stages`` holds one function per stage, each
calling the real command; ``line`` starts the daemon and streams the test images to it.
"""

from nexedge.demo.run import configure_demo, run_demo

__all__ = ["configure_demo", "run_demo"]
