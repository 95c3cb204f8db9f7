"""The text condition of a UNet pipeline (SD 1.x/2.x, SDXL) and the token-id helpers the attacks share."""

from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import UsageError


class TextCondition:
    """Token ids → the text condition a UNet pipeline's denoiser reads, as the pipeline's ``encode_prompt`` builds it.

    SD 1.x/2.x: one CLIP encoder; its last hidden state (after the final layer norm) is the UNet's
    ``encoder_hidden_states``. SDXL: two CLIP encoders over one vocabulary (ViT-L and OpenCLIP ViT-bigG); their
    penultimate hidden states, concatenated on the feature axis, are ``encoder_hidden_states`` (768 + 1280 = 2048
    wide), and the second's pooled projection with the micro-conditioning time ids (original size, crop corner,
    target size) is the UNet's added condition. The attacks work on token ids of the first tokenizer, framed for
    each tokenizer (their padding tokens differ), so one search or one token distribution drives both encoders.
    """

    def __init__(self, tokenizers, text_encoders, penultimate: bool = False):
        self.tokenizers, self.text_encoders, self.penultimate = list(tokenizers), list(text_encoders), penultimate
        if len(self.tokenizers) > 1:
            first = self.tokenizers[0].get_vocab()
            if any(t.get_vocab() != first for t in self.tokenizers[1:]):
                raise UsageError(
                    "the pipeline's tokenizers have different vocabularies: the attacks need one token space (SDXL's two "
                    "CLIP tokenizers share theirs)"
                )

    @classmethod
    def of(cls, text_encoder, tokenizer=None) -> "TextCondition":
        """A TextCondition as given, or one CLIP encoder with its tokenizer (SD 1.x/2.x)."""
        return text_encoder if isinstance(text_encoder, TextCondition) else cls([tokenizer], [text_encoder])

    @classmethod
    def from_pipe(cls, pipe, attack: str, needs_unet: bool = True) -> "TextCondition":
        """The pipeline's condition; refuses a pipeline without CLIP encoders (feeding a UNet, unless
        ``needs_unet`` is False: then a pipeline without a UNet gets its first CLIP encoder alone, as Ring-A-Bell
        has always scored SD3)."""
        needed = ("tokenizer", "text_encoder", "unet") if needs_unet else ("tokenizer", "text_encoder")
        missing = [name for name in needed if getattr(pipe, name, None) is None]
        if missing:
            raise UsageError(
                f"{attack} needs a UNet pipeline with CLIP text encoders (Stable Diffusion 1.x/2.x or XL); "
                f"{type(pipe).__name__} lacks {', '.join(missing)}"
            )
        two = getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "tokenizer_2", None) is not None
        if two and getattr(pipe, "unet", None) is not None:
            return cls([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], penultimate=True)
        return cls([pipe.tokenizer], [pipe.text_encoder])

    @property
    def tokenizer(self):
        """The tokenizer whose ids the attacks draw and decode (SDXL: the first; the vocabularies are one)."""
        return self.tokenizers[0]

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) > 1

    @property
    def device(self):
        return self.text_encoders[0].device

    @property
    def shape(self) -> Tuple[int, int]:
        """(sequence, features) of the condition: a concept vector's shape."""
        return (self.tokenizer.model_max_length, sum(e.config.hidden_size for e in self.text_encoders))

    def tokenize(self, prompts: Sequence[str]) -> List[torch.Tensor]:
        return [tokenize(tokenizer, prompts) for tokenizer in self.tokenizers]

    def frame(self, token_ids: torch.Tensor) -> List[torch.Tensor]:
        """(N, K) token ids framed by each tokenizer: start, the K tokens, end, padding."""
        return [frame_token_ids(tokenizer, token_ids) for tokenizer in self.tokenizers]

    def encode(self, input_ids: Sequence[torch.Tensor], prefixes: Optional[Sequence[torch.Tensor]] = None):
        """(encoder_hidden_states, pooled projection or None) of framed ids, one tensor per tokenizer.

        ``prefixes``: one (k, hidden) tensor per encoder, swapped in for the token embeddings at positions 1..k
        (UnlearnDiffAtk). Gradients flow when the caller enables them.
        """
        states, pooled = [], None
        for index, (encoder, ids) in enumerate(zip(self.text_encoders, input_ids)):
            handle = None
            if prefixes is not None:
                handle = encoder.get_input_embeddings().register_forward_hook(prefix_embeddings_hook(prefixes[index]))
            try:
                output = encoder(ids.to(encoder.device), output_hidden_states=self.penultimate)
            finally:
                if handle is not None:
                    handle.remove()
            states.append(output.hidden_states[-2] if self.penultimate else output.last_hidden_state)
            if self.is_sdxl and index == len(self.text_encoders) - 1:
                pooled = output.text_embeds  # CLIPTextModelWithProjection's pooled projection
        return torch.cat(states, dim=-1), pooled

    @torch.no_grad()
    def encode_ids(self, input_ids: Sequence[torch.Tensor], batch_size: int = 256) -> torch.Tensor:
        """The condition's sequence embeddings in fp32, in batches (Ring-A-Bell's distances)."""
        if not self.is_sdxl:
            return encode_token_ids(self.text_encoders[0], input_ids[0], batch_size)
        total = len(input_ids[0])
        return torch.cat(
            [
                self.encode([ids[i : i + batch_size] for ids in input_ids])[0].float()
                for i in range(0, total, batch_size)
            ]
        )

    def unet_kwargs(self, pooled: Optional[torch.Tensor], batch: int, resolution: int, dtype) -> dict:
        """SDXL's added condition for ``batch`` images of ``resolution``: the pooled projection and the time ids
        (original size, crop (0, 0), target size), as the pipeline builds them; nothing for SD 1.x/2.x."""
        if not self.is_sdxl:
            return {}
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype)
        return {
            "added_cond_kwargs": {
                "text_embeds": pooled.to(dtype).expand(batch, -1),
                "time_ids": time_ids.to(pooled.device).expand(batch, -1),
            }
        }


def prefix_embeddings_hook(prefix: torch.Tensor):
    """A forward hook for a token-embedding layer: its output at positions 1..k becomes ``prefix`` (k, hidden)."""

    def replace_prefix(module, inputs, output):
        return torch.cat(
            [
                output[:, :1],
                prefix.unsqueeze(0).to(output.dtype).expand(len(output), -1, -1),
                output[:, 1 + len(prefix) :],
            ],
            dim=1,
        )

    return replace_prefix


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_token_ids(text_encoder, input_ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The text encoder's last hidden states (the diffusion model's condition), in fp32."""
    device = text_encoder.device
    outputs = [
        text_encoder(input_ids[i : i + batch_size].to(device)).last_hidden_state.float()
        for i in range(0, len(input_ids), batch_size)
    ]
    return torch.cat(outputs)


def all_token_ids(tokenizer) -> torch.Tensor:
    """Every token of the vocabulary except the special ones (start, end, padding)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def decode_token_ids(tokenizer, token_ids: Sequence[int]) -> str:
    """The prompt text of a token sequence as the originals write it: the tokenizer's own decoding."""
    return tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=True).strip()


def frame_token_ids(tokenizer, token_ids: torch.Tensor) -> torch.Tensor:
    """Wrap (N, K) token ids as the tokenizer would: start token, the K tokens, end token, padding."""
    num, length = token_ids.shape
    max_length = tokenizer.model_max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    framed = torch.full((num, max_length), pad_id, dtype=torch.long)
    framed[:, 0] = tokenizer.bos_token_id
    framed[:, 1 : 1 + length] = token_ids
    framed[:, 1 + length] = tokenizer.eos_token_id
    return framed
