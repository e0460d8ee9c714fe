"""RISDA in your own training loop: torchvision's resnet18 (its `fc` is the classifier), the
shared CIFAR-10 images made long-tailed, plain PyTorch, nothing of risda's trainer. Stage I is
plain cross-entropy; at the switch one pass over the training set prepares `RISDALoss`, which is
the loss from then on.

    python examples/plug_in.py --data-root ../shared/data/cifar10-jpeg     # a tiny subset: ~1 min on a CPU
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

from risda import RISDALoss

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--data-root", required=True, help="an ImageFolder tree: <root>/train/<class>/*, <root>/test/<class>/*")
p.add_argument("--n-max", type=int, default=40, help="images of the largest class")
p.add_argument("--imbalance", type=float, default=10, help="λ = n_max / n_min")
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--test-per-class", type=int, default=20)
args = p.parse_args()
torch.manual_seed(0)


def first_images(split, per_class):
    """The first per_class[c] images of every class c, as one uint8-range float tensor."""
    data = torchvision.datasets.ImageFolder(f"{args.data_root}/{split}", transform=T.ToTensor())
    seen, keep = [0] * len(data.classes), []
    for i, c in enumerate(data.targets):
        if seen[c] < per_class[c]:
            seen[c], keep = seen[c] + 1, keep + [i]
    images, labels = zip(*(data[i] for i in keep))
    return torch.stack(images), torch.tensor(labels)


C = 10  # LDAM-DRW's long-tail profile: n_c = n_max · λ^(−c/(C−1))
counts = [int(args.n_max * args.imbalance ** (-c / (C - 1))) for c in range(C)]
x_train, y_train = first_images("train", counts)
x_test, y_test = first_images("test", [args.test_per_class] * C)

net = torchvision.models.resnet18(num_classes=C)
classifier, net.fc = net.fc, torch.nn.Identity()  # net(x) is now the feature f, classifier(f) the logits
optimizer = torch.optim.SGD([*net.parameters(), *classifier.parameters()], lr=0.01, momentum=0.9, weight_decay=5e-4)
criterion = RISDALoss(counts, feature_dim=classifier.in_features, alpha=0.5, beta=0.75)
stage1 = int(0.8 * args.epochs)


@torch.no_grad()
def training_set_outputs():
    """Features and logits of the training set as the loss sees them (train-mode batch norm, shuffled
    batches), leaving the running statistics as they were."""
    saved, order = {k: v.clone() for k, v in net.state_dict().items()}, torch.randperm(len(y_train))
    net.train()
    features = torch.empty(len(y_train), classifier.in_features)
    features[order] = torch.cat([net(x_train[b]) for b in order.split(32)])
    net.load_state_dict(saved)
    return features, classifier(features), y_train


for epoch in range(args.epochs):
    if epoch == stage1:
        criterion.prepare(*training_set_outputs())  # prototypes, knowledge graph, starting statistics
    net.train()
    for batch in torch.randperm(len(y_train)).split(32):
        x, y = x_train[batch], y_train[batch]
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)  # random horizontal flip
        features = net(x)
        logits = classifier(features)
        stage2 = criterion(features, logits, y, classifier, progress=epoch / args.epochs) if epoch >= stage1 else None
        loss = F.cross_entropy(logits, y) if stage2 is None else stage2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        error = 100 * (classifier(net(x_test)).argmax(1) != y_test).float().mean().item()
    print(f"epoch {epoch + 1}/{args.epochs}  stage {'I' if epoch < stage1 else 'II'}  loss {loss.item():.3f}  "
          f"test error {error:.1f}%")
