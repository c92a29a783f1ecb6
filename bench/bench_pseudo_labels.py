"""Cost of pseudo-label generation relative to the backbone forward pass, per 320x320 image.

Pseudo labels (``primaps_dist.pseudo_labels.make_pseudo_labels``: PriMaPs proposals + bilinear upsampling +
dense CRF + class prediction and assembly) are timed next to the forward pass of DINO ViT-S/8
(timm ``vit_small_patch8_224``, random weights, never downloaded) on the same CPU, thread count and
images. Target: pseudo labels <= 25 % of the backbone forward. Times are CPU time of this process
(robust to other load on a shared machine); wall time is printed as well.

    python bench/bench_pseudo_labels.py                        # torch CRF backend, crf.downsample default
    python bench/bench_pseudo_labels.py --crf-downsample 1     # torch CRF, every update at full resolution
    python bench/bench_pseudo_labels.py --crf-backend pydensecrf
    python bench/bench_pseudo_labels.py --crf-backend none     # proposals + assembly only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from primaps_dist.config import CRFConfig  # noqa: E402
from primaps_dist.crf import crf_from_config  # noqa: E402
from primaps_dist.ops import argmax_channels, upsample_logits  # noqa: E402
from primaps_dist.primaps import mask_logits  # noqa: E402
from primaps_dist.pseudo_labels import (  # noqa: E402
    _label_groups,
    _resize_images,
    assemble,
    make_pseudo_labels,
)
from primaps_dist.prototypes import nearest_prototype_upsampled  # noqa: E402
from primaps_dist.testing.primaps_reference import planted_features  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


class Clock:
    """CPU and wall time of a block; ``per_image`` divides by the batch size."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0

    def __enter__(self) -> "Clock":
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *_) -> None:
        self.cpu += time.process_time() - self._cpu
        self.wall += time.perf_counter() - self._wall


def photos(batch: int, size: int) -> torch.Tensor:
    from primaps_dist.testing.photo_features import PHOTOS, photo

    return torch.stack([photo(PHOTOS[i % len(PHOTOS)], size) for i in range(batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--label-size", type=int, default=0, help="pseudo-label side (default: image size)")
    parser.add_argument("--crf-backend", choices=("torch", "pydensecrf", "none"), default="torch")
    parser.add_argument("--crf-iterations", type=int, default=10)
    parser.add_argument("--crf-downsample", type=int, default=CRFConfig().downsample,
                        help="crf.downsample of the torch backend (default: the config default)")
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--regions", type=int, default=24, help="planted regions of the proposal features")
    parser.add_argument("--noise", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

    import timm

    images = photos(args.batch, args.size)
    # Proposal features with realistic structure (random ViT weights would give meaningless maps);
    # the ViT below only provides the reference time.
    features = planted_features(args.batch, channels=384, size=args.size // 8, regions=args.regions,
                                noise=args.noise, seed=0)
    prototypes = F.normalize(torch.randn(args.classes, 384, generator=torch.Generator().manual_seed(0)), dim=1)
    # The pipeline's CRF step (None for backend none); pydensecrf ignores the downsample factor.
    crf_fn = crf_from_config(CRFConfig(backend=args.crf_backend, iterations=args.crf_iterations,
                                       downsample=args.crf_downsample))
    size = (args.label_size or args.size,) * 2

    vit = timm.create_model("vit_small_patch8_224", pretrained=False, dynamic_img_size=True, num_classes=0).eval()
    vit_input = (images - IMAGENET_MEAN) / IMAGENET_STD
    with torch.inference_mode():
        vit.forward_features(vit_input[:1, :, :64, :64])  # warm-up
        make_pseudo_labels(features[:1, :, :8, :8], images[:1, :, :64, :64], prototypes, crf_fn=crf_fn)

    backbone, total = Clock(), Clock()
    split = {name: Clock() for name in ("proposals", "upsample", "crf", "assign")}
    proposal_counts = None
    with torch.inference_mode():
        for _ in range(args.repeats):
            with backbone:
                vit.forward_features(vit_input)
            with total:
                result = make_pseudo_labels(features, images, prototypes, crf_fn=crf_fn, label_size=size)
            proposal_counts = result.num_proposals
            # The same pipeline step by step (same image groups as make_pseudo_labels), for the split.
            with split["proposals"]:
                logits = mask_logits(features)
            counts = torch.isfinite(logits[:, 1:, 0, 0]).sum(dim=1)
            mask_ids = torch.empty(args.batch, *size, dtype=torch.int64)
            for group, used in _label_groups(counts, size[0] * size[1]):
                with split["upsample"]:
                    scores = upsample_logits(logits[group, :used], size, memory_format=torch.channels_last,
                                             whole_channels=True)
                with split["crf"]:
                    if crf_fn is not None:
                        scores = crf_fn(scores, _resize_images(images[group], size))
                with split["assign"]:
                    mask_ids[group] = argmax_channels(scores)
            with split["assign"]:
                labels = assemble(mask_ids, nearest_prototype_upsampled(features, prototypes, size), args.classes)
            assert torch.equal(labels, result.labels)

    images_done = args.batch * args.repeats

    def per_image(clock: Clock, kind: str) -> float:
        return 1000 * getattr(clock, kind) / images_done

    print(f"{images_done} images of {args.size}x{args.size}, labels {size[0]}x{size[1]}, threads {args.threads}, "
          f"CRF backend {args.crf_backend if crf_fn else 'none'} ({args.crf_iterations} iterations"
          f"{f', downsample {args.crf_downsample}' if crf_fn and args.crf_backend == 'torch' else ''}), "
          f"proposals per image {proposal_counts.tolist()}")
    for kind in ("cpu", "wall"):
        share = 100 * per_image(total, kind) / per_image(backbone, kind)
        print(f"[{kind:4s}] ViT-S/8 forward {per_image(backbone, kind):8.1f} ms/image | pseudo labels "
              f"{per_image(total, kind):8.1f} ms/image = {share:6.1f} % of the forward")
        print("        split: " + ", ".join(
            f"{name} {per_image(clock, kind):.1f} ms ({100 * per_image(clock, kind) / per_image(backbone, kind):.1f} %)"
            for name, clock in split.items()))
    ratio = per_image(total, "cpu") / per_image(backbone, "cpu")
    print(f"pseudo labels / backbone forward (CPU time): {100 * ratio:.1f} % (target <= 25 %)")
    print(json.dumps({"ratio_cpu": ratio, "vit_ms": per_image(backbone, "cpu"),
                      **{f"{name}_ms": per_image(clock, "cpu") for name, clock in split.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
