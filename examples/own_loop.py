"""Train a student from a fastkd store in a plain torch loop: no fastkd trainer.

    python examples/own_loop.py --store STORE --data DATA --student NAME:ARCH=CKPT

With the same seed and settings it takes the steps ``fastkd train --backend torch`` takes (Adam
at a constant lr, CE + KL at T = 1, the partition decided per row by the student's live outputs):
tests/test_api.py holds its loss curve to the command's.
"""

import argparse

import torch

import fastkd


class StoredViews(torch.utils.data.Dataset):
    """Row i of an epoch: its stored view rebuilt from the image's bytes, its label, i."""

    def __init__(self, store, data, transform, samples, views):
        self.data, self.samples, self.labels = data, samples, store.labels[samples]
        self.boxes, self.flips = store.view_params(samples, views)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image = self.data.read_bytes(self.samples[i])  # a file's, or a tar shard member's
        return self.transform(image, self.boxes[i], self.flips[i]), int(self.labels[i]), i


def main(args):
    data = fastkd.open_dataset(args.data)
    store = fastkd.open_store(args.store, data)  # refuses a store of other images or labels
    student = fastkd.load_model(args.student, num_classes=data.num_classes)
    model = student.model.train()
    transform = fastkd.ViewTransform(student.data_config)
    members, _ = fastkd.target_columns(store.model_names, student.spec.name)  # its teachers
    criterion = fastkd.PartitionedKDLoss(mode="live", temperature=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    torch.manual_seed(args.seed)  # dropout noise, seeded as fastkd train seeds it
    for epoch in range(args.epochs):
        samples, views = fastkd.epoch_rows(store, epoch, seed=args.seed)
        rows = StoredViews(store, data, transform, samples, views)
        loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, num_workers=2)
        total = 0.0
        for images, labels, index in loader:
            targets = fastkd.read_targets(store, samples[index], views[index], members)
            loss, _ = criterion(model(images), labels, targets)  # and per-row stats
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
        print(f"epoch {epoch + 1} loss {total / len(samples):.9g}", flush=True)
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--data", required=True, help="the images dumped (folder, list, shards)")
    parser.add_argument("--student", required=True, help="[alias:]ARCH[=CKPT], as fastkd's")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="student.pt", help="where the trained weights go")
    main(parser.parse_args())
