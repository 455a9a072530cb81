"""Small hand-built networks with known BatchNorm statistics, shared by the method tests."""
import torch
from torch import nn


class ConvBnReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
            self.bn1.bias.copy_(torch.tensor([0.2, -0.3, 1.0, -2.0]))
            self.bn2.weight.copy_(torch.tensor([1.0, 1.0, 3.0, 0.5]))
            self.bn2.bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 0.0]))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.conv3(self.bn2(self.conv2(h)) + h)  # residual add, no ReLU: signed



class BnNet(nn.Module):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.fc = nn.Linear(6 if pool else 6 * 6 * 6, 10)
        with torch.no_grad():  # channels of very different spread
            self.bn1.weight.copy_(torch.logspace(-2, 1, 8))
            self.bn1.bias.copy_(torch.linspace(-0.5, 0.5, 8))
            self.bn2.weight.copy_(torch.logspace(-1, 0.5, 6))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn2(self.conv2(h)))), 1))


