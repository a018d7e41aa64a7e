"""An independent, literal transcription of the reference's test-time loop (per-sample crops,
flattened policy state, stateful classifier), used to check the batched ``GFNet.trace``.

It reuses the model's weights but none of its step logic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _get_patch(images, action, patch_size):
    image_size = images.size(2)
    coord = torch.floor(action * (image_size - patch_size)).int()
    patches = []
    for i in range(images.size(0)):
        r, c = coord[i, 0].item(), coord[i, 1].item()
        patches.append(images[i, :, r:r + patch_size, c:c + patch_size].unsqueeze(0))
    return torch.cat(patches, 0), coord


def reference_trace(model, images):
    spec = model.spec
    P, T = spec.patch_size, spec.steps
    pol = model.policy
    hidden_pol = []

    def act(state, restart):
        state = state.view(1, state.size(0), state.size(1))
        if restart:
            hidden_pol.clear()
            hidden_pol.append(torch.zeros(1, state.size(1), pol.hidden_size))
        if pol.conv:
            s = pol.state_encoder(state[0].view(-1, pol.fmap_channels, pol.fmap_hw, pol.fmap_hw))
        else:
            s = pol.state_encoder(state[0])
        s, h = pol.gru(s.view(1, s.size(0), s.size(1)), hidden_pol[-1])
        hidden_pol.append(h)
        return pol.actor(s[0])

    fc = model.fc
    fc_state = {}

    def classify(x, restart):
        if fc.kind == "gru":
            h0 = torch.zeros(1, x.size(0), fc.hidden_size) if restart else fc_state["h"]
            out, h = fc.rnn(x.view(1, x.size(0), x.size(1)), h0)
            fc_state["h"] = h
            return fc.fc(out[0])
        fc_state["h"] = x if restart else torch.cat([fc_state["h"], x], 1)
        k = fc_state["h"].size(1) // fc.feature_dim
        return None if k == 1 else getattr(fc, f"fc_{k}")(fc_state["h"])

    def encoder(enc, x):
        pooled, fmap = enc(x)
        return pooled, fmap.reshape(fmap.size(0), -1)

    probs, coords = [], []
    with torch.no_grad():
        prime = F.interpolate(images, size=[P, P], mode=spec.glance_interpolation, align_corners=True)
        output, state = encoder(model.model_prime, prime)
        if spec.classifier == "gru" and spec.step0 == "classifier":
            output = classify(output, True)
        else:
            _ = classify(output, True)
            output = model.model_prime.logits(output)
        probs.append(F.softmax(output, 1))
        for step in range(1, T):
            action = act(state, restart=(step == 1))
            patches, coord = _get_patch(images, action, P)
            coords.append(coord)
            output, state = encoder(model.model, patches)
            output = classify(output, False)
            probs.append(F.softmax(output, 1))
    return torch.stack(probs), torch.stack(coords) if coords else None
