"""CI check: the daemon-side and device-side modules import without torch (a Jetson runs them without it)."""

import importlib
import pkgutil
import sys


class _Block:
    def find_spec(self, name, path=None, target=None):  # noqa: D401
        if name == "torch" or name.startswith("torch.") or name == "torchvision":
            raise ImportError(f"daemon-side module imported {name!r}")
        return None


ROOTS = ["nexedge.threads", "nexedge.card", "nexedge.metrics", "nexedge.preprocess", "nexedge.runtime", "nexedge.serve",
         "nexedge.store",
         # a Jetson's line install runs these too (doctor, build-engine, thresholds, check-onnx)
         "nexedge.doctor", "nexedge.export.cuda_device", "nexedge.export.trt_rules", "nexedge.export.trt_names",
         "nexedge.export.trt_recipe", "nexedge.export.trt_network", "nexedge.export.trt_build",
         "nexedge.export.thresholds", "nexedge.export.onnx_check", "nexedge.export.cli",
         # the command line lists the architectures (--arch help, --pretrained checks) without torch
         "nexedge.models.archs", "nexedge.train.cli", "nexedge.demo.cli"]


def main() -> int:
    sys.meta_path.insert(0, _Block())
    names = []
    for root in ROOTS:
        mod = importlib.import_module(root)
        names.append(root)
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, root + "."):
                importlib.import_module(info.name)
                names.append(info.name)
    print("imported without torch: " + ", ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
