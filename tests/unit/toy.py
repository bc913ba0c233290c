"""A toy eps-denoiser small enough for many loop tests per second: two convs around an attention-like
Linear named ``to_q``, conditioned on a pooled context."""

import torch

from training.batching import InMemoryData


class ToyNet(torch.nn.Module):
    def __init__(self, channels: int = 4, width: int = 16, context: int = 8):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels + 1, width, 3, padding=1)
        self.to_q = torch.nn.Linear(width, width)
        self.to_k = torch.nn.Linear(context, width)
        self.conv_out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, context):
        time = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        h = torch.nn.functional.silu(self.conv_in(torch.cat([x, time], dim=1)))
        h = h + self.to_k(context.mean(dim=1))[:, :, None, None]
        h = self.to_q(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(torch.nn.functional.silu(h))


class ToyDenoiser:
    def __init__(self, prediction: str = "eps", seed: int = 0):
        torch.manual_seed(seed)
        self.module = ToyNet()
        self.prediction = prediction

    def __call__(self, noisy, timestep, cond):
        return self.module(noisy, timestep, cond["context"])


def toy_data(count: int = 4, size: int = 8, seed: int = 0) -> InMemoryData:
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(4, size, size, generator=g) for _ in range(count)]
    conds = [{"context": torch.randn(3, 8, generator=g)} for _ in range(count)]
    return InMemoryData(latents, conds)


class ToyEncoders:
    """Deterministic stand-ins for a VAE (8× average pool + a fixed channel mix) and a text encoder
    (one embedding per word, so captions give sequences of different lengths). Calls are counted."""

    latent_multiple = 8

    def __init__(self, identity: str = "toy-v1"):
        self.identity = identity
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(4, 3, generator=g)
        self.words = torch.randn(64, 8, generator=g)
        self.image_calls = 0
        self.text_calls = 0

    def encode_image(self, pixels):
        self.image_calls += 1
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)[0]
        return torch.einsum("oc,chw->ohw", self.mix, pooled)

    def encode_text(self, caption, image=None):
        """With an image (edit pairs), its mean colour is one more token, as a VL encoder sees the image."""
        self.text_calls += 1
        ids = [sum(map(ord, w)) % 64 for w in caption.replace(",", " ").split()] or [0]
        context = self.words[ids]
        if image is not None:
            context = torch.cat([context, image.mean(dim=(0, 2, 3)).repeat(3)[None, :8]])
        return {"context": context, "pooled": context.mean(dim=0)}
