"""Masked autoencoder (He et al., 2022) around the FAHR-Face encoder.

The encoder is exactly `build_encoder(arch, img_size)`, so `MAE(...).encoder.state_dict()` is what
`load_encoder_weights` loads into a SurvivalViT. The encoder sees only the visible 25% of the
patches (no mask tokens); a light decoder, with a fixed sin-cos position table and a learned mask
token, reconstructs the pixels of every patch, and the loss is the MSE on the masked patches only,
of per-patch normalised pixels by default (the paper's "norm pix" target).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from fahr_core.models.archs import FAHR_FACE_ARCH
from fahr_core.models.vit import PATCH, build_encoder, sincos_pos_embed


class MAE(nn.Module):
    def __init__(
        self,
        arch: str = FAHR_FACE_ARCH,
        img_size: int = 112,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.arch, self.img_size = arch, img_size
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.encoder = build_encoder(arch, img_size)
        self.grid = img_size // PATCH
        self.num_patches = self.grid**2
        dim = self.encoder.embed_dim

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, like the encoder's; a buffer so it never reaches the optimiser.
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, PATCH * PATCH * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if not name.startswith("decoder"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def len_keep(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, 16*16*3), pixels of a patch in (row, column, channel) order."""
        b, c, h, w = imgs.shape
        gh, gw = h // PATCH, w // PATCH
        x = imgs.reshape(b, c, gh, PATCH, gw, PATCH)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, PATCH * PATCH * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, 16*16*3) -> (B, 3, H, W); the inverse of `patchify` for a square grid."""
        b, n, _ = x.shape
        g = int(round(n**0.5))
        x = x.reshape(b, g, g, PATCH, PATCH, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, g * PATCH, g * PATCH)

    def random_masking(
        self, x: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the `len_keep` patches with the smallest noise. Returns (kept, mask, ids_restore).

        mask is (B, L) with 1 for a masked (dropped) patch, in the original patch order.
        """
        b, n, d = x.shape
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : self.len_keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, : self.len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        # timm types both as Optional; fahr's encoders always have them (models.vit builds them so)
        assert enc.pos_embed is not None and enc.cls_token is not None
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        for blk in enc.blocks:
            x = blk(x)
        # With global_pool="avg", timm moves the final LayerNorm to fc_norm (applied after pooling)
        # and leaves norm as Identity; pre-training applies that LayerNorm to every token, so it is
        # trained and the pooled features of the fine-tuned model start from a trained norm.
        norm = enc.fc_norm if isinstance(enc.norm, nn.Identity) else enc.norm
        return norm(x), mask, ids_restore

    def decoder_pos_table(self) -> torch.Tensor:
        """The decoder's fixed sin-cos position table (a buffer: registered buffers are untyped)."""
        table = self.decoder_pos_embed
        assert isinstance(table, torch.Tensor)
        return table

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        tokens = torch.cat([x[:, 1:, :], self.mask_token.expand(b, n + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_table()
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        t = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = ((pred.float() - self.target(imgs.float())) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs in [-1, 1], (B, 3, H, W) -> (loss, pred (B, L, 768), mask (B, L), 1 = masked).

        The mask comes from `noise` (B, L) when given (the trainer draws it for the global batch so
        a multi-process run masks like a single process), else from uniform noise drawn with
        `generator`.
        """
        if noise is None:
            noise = torch.rand(
                imgs.shape[0],
                self.num_patches,
                generator=generator,
                device=generator.device if generator is not None else "cpu",
            )
        latent, mask, ids_restore = self.forward_encoder(imgs, noise.to(imgs.device))
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(imgs, pred, mask), pred, mask
