"""What evaluate.py and text.py both measure with: the per-depth NLL report and the judge (a small CNN
classifier, loaded or trained, and its accuracy), and the sampling and retrieval helpers of the captioned
evaluation (text.py and trained.py). Imports none of them, so imports run one way: evaluate -> text -> trained
-> here.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm.auto import tqdm

from rqcore.pretrained import load_weights, write_safetensors
from training.captions import spread

SAMPLES = 4  # samples per sampled (name, style) pair
GRID_ROWS = 16  # rows (real image, then its samples) in a saved grid


class SmallClassifier(nn.Module):
    """A strided stem, four conv stages and global pooling: enough to tell emoji categories apart at 64 px."""

    def __init__(self, num_classes: int, width: int = 24):
        super().__init__()
        layers, cin = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.ReLU()], width  # halve first: CPU-cheap
        for i in range(4):
            cout = width * 2 ** i
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(cin, num_classes))

    def embed(self, x):  # [B,3,H,W] in [-1,1] -> pooled penultimate features [B,F] (for retrieval)
        return self.features(x).mean((2, 3))

    def forward(self, x):  # [B,3,H,W] in [-1,1] -> logits [B,C]
        return self.head(self.embed(x))


def fit_classifier(ds, num_classes: int, steps: int, seed: int = 0) -> SmallClassifier:
    """A SmallClassifier trained for `steps` steps on `ds` (items (image [3,R,R], label, ...))."""
    torch.manual_seed(seed)
    model = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    loader = DataLoader(ds, batch_size=64, shuffle=True, drop_last=len(ds) > 64, num_workers=1,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    step, bar = 0, tqdm(total=steps, desc="classifier")
    while step < steps:
        for x, y, *_ in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step >= steps:
                break
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([classifier(x).argmax(-1) for x in images.split(128)])
    return float((preds == labels).float().mean())


def judge(args, num_classes: int, train) -> SmallClassifier:
    """The judge: loaded from --classifier when that file exists, else train() (and saved there)."""
    path = Path(args.classifier) if args.classifier else None
    if path is not None and path.is_file():
        model = SmallClassifier(num_classes)
        load_weights(model, path)
        return model.eval()
    model = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def nll_report(nll: torch.Tensor) -> dict:
    """Per-depth NLL [D] (nats) -> nll_depth*, perplexity_depth*, nll_mean."""
    out = {f"nll_depth{d + 1}": round(float(v), 4) for d, v in enumerate(nll)}
    out.update({f"perplexity_depth{d + 1}": round(math.exp(v), 2) for d, v in enumerate(nll.tolist())})
    out["nll_mean"] = round(float(nll.mean()), 4)
    return out


@torch.no_grad()
def judged(classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N,3,R,R] -> (unit-norm judge features [N,F], predicted categories [N])."""
    feats = torch.cat([classifier.embed(x) for x in images.split(128)])
    return F.normalize(feats, dim=1), classifier.head(feats).argmax(-1)


def sample(pipe, rows: list[tuple[str, int]], args, generator, desc: str) -> torch.Tensor:
    """SAMPLES images of each (prompt, style) row -> [len(rows) * SAMPLES, 3, R, R] in [-1,1], in row order;
    several rows per call (one prompt and label per image), up to pipe.max_images images a call."""
    jobs = [row for row in rows for _ in range(SAMPLES)]
    out = []
    for i in tqdm(range(0, len(jobs), pipe.max_images), desc=desc):
        prompts, labels = zip(*jobs[i:i + pipe.max_images])
        images = pipe(list(labels), prompt=list(prompts), guidance_scale=args.guidance_scale,
                      temperature=args.temperature, top_k=args.top_k, generator=generator, output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out) if out else torch.zeros(0, 3, pipe.resolution, pipe.resolution)


def sample_query(feats: torch.Tensor, pairs: int) -> torch.Tensor:
    """The judge features of SAMPLES samples per pair [pairs * SAMPLES, F] -> their unit means [pairs, F]."""
    return F.normalize(feats.view(pairs, SAMPLES, feats.shape[1]).mean(1), dim=1)


def retrieval_ranks(query, gallery, gallery_styles, styles, targets) -> torch.Tensor:
    """Rank (1 = nearest, by cosine) of each query's target among the gallery images of its style.
    query [P,F] and gallery [M,F] unit-norm, gallery_styles [M], styles [P], targets [P] gallery rows -> [P]."""
    sims = (query @ gallery.T).masked_fill(gallery_styles[None] != styles[:, None], float("-inf"))  # [P,M]
    target = sims[torch.arange(len(query)), targets]  # [P]
    return (sims > target[:, None]).sum(1) + 1


def save_rows(images: torch.Tensor, samples: torch.Tensor, rows: list[int], file: Path) -> None:
    """A grid: for up to GRID_ROWS rows (spread), the real image, then its SAMPLES samples."""
    shown = spread(list(range(len(rows))), GRID_ROWS)
    if shown:
        grid = torch.cat([torch.cat([images[rows[k]][None], samples[SAMPLES * k:SAMPLES * (k + 1)]]) for k in shown])
        save_image(grid * 0.5 + 0.5, file, nrow=SAMPLES + 1)
