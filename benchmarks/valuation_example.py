"""The data-valuation example of docs/valuation.md, run as written: score 2000 examples with 10% noisy labels by
EL2N and GraNd (4 initialisations, 2 warm-up epochs), drop the hardest 10% and the easiest 40%, train on the rest.
Appends the outcome (noisy labels among the 200 hardest, test accuracies) to
``benchmarks/results/<device>/valuation-example.json``.

    python -m benchmarks.valuation_example
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import regops
from benchmarks import harness


def main() -> dict:
    torch.manual_seed(0)
    x, w = torch.randn(3000, 20), torch.randn(20, 5)
    y = (x @ w).argmax(1)
    x_test, y_test, x, y = x[2000:], y[2000:], x[:2000], y[:2000].clone()
    y[:200] = torch.randint(0, 5, (200,))  # 10% noisy labels
    loader = [(x[i : i + 250], y[i : i + 250]) for i in range(0, 2000, 250)]  # unshuffled: dataset order

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))

    def train(model, xs, ys, epochs):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(epochs):
            perm = torch.randperm(len(xs))
            for i in range(0, len(xs), 50):
                opt.zero_grad()
                F.cross_entropy(model(xs[perm[i : i + 50]]), ys[perm[i : i + 50]]).backward()
                opt.step()
        return model

    def accuracy(model):
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).double().mean().item()

    scores = regops.data_scores(
        make, F.cross_entropy, loader, ("el2n", "grand"), seeds=range(4), train_fn=lambda m: train(m, x, y, epochs=2)
    )
    order = scores["el2n"].argsort(descending=True)  # hardest first
    keep = order[200:1200]  # drop the hardest 10% and the easiest 40%
    result = {"noisy_among_200_hardest": int((order[:200] < 200).sum())}
    result["accuracy_pruned_1000"] = accuracy(train(make(10), x[keep], y[keep], epochs=20))
    result["accuracy_all_2000"] = accuracy(train(make(10), x, y, epochs=20))
    random = torch.randperm(2000)[:1000]
    result["accuracy_random_1000"] = accuracy(train(make(10), x[random], y[random], epochs=20))
    print(result)
    env = harness.environment(torch.device("cpu"), ["python", "-m", "benchmarks.valuation_example"])
    print(f"appended to {harness.record(harness.result_path('valuation-example'), {'environment': env, **result})}")
    return result


if __name__ == "__main__":
    main()
