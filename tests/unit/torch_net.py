"""A small two-input, two-output module for the PyTorch backend tests (also written out as model.py)."""

import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x)) * self.scale
        return h + y, h.sum(dim=1, keepdim=True)


def create_model() -> Net:
    return Net()
