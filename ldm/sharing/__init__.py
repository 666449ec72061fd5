"""Batch-shared self-attention: images generated in one batch depict one consistent subject.

This is the entrance of the feature: why it works, what each query sees, how it reaches the model, and
where the next mechanism goes. The modules of the package, one job each:

    settings.py    SharedAttentionSettings: every option, its checks, every conversion (values, text, metadata)
    layers.py      which layers share: tags, group names, the `--shared-attn help` listing
    kernels.py     which keys and values each query image sees, and one attention over them
    transforms.py  AdaIN, the group mean, 2x2 pooling: q, k, v transformed before the kernels
    subject_words.py  where each subject is named in each prompt (its tokens)
    masks.py       subject masks read from the subject words' cross-attention, one label per token
    run.py         SharingRun: one run's state (masks, dropout generator, reference) and its `attend`
    controller.py  SharedAttention: switches a run on for this project's UNet, and off again
    reference.py   anchors recorded in one run and offered to later ones
    diffusers_processors.py  the same run in a diffusers pipeline

Why it works
------------
In a UNet self-attention layer (`attn1`), every pixel token of an image asks "which other places of this
image look like me?" (query . key) and copies their content (values). That is how the model keeps one
object coherent across the picture: the texture of a chair's left leg is copied to the right leg, the
colour of the seat to the back. Nothing ties two images of a batch together, so two samples of
"a wooden chair" come out as two different chairs.

Batch sharing lets each image's queries also see the keys and values of the other images in its batch.
A token of image 1 that belongs to the chair finds matching chair tokens in images 2, 3, ... and copies
appearance from them too, exactly the way it already copies within its own image. Repeated at every
denoising step, the images settle on shared appearance (colour, material, pattern, identity) while
each keeps its own queries, noise and therefore its own layout and pose. Cross-attention (`attn2`, the
text) is never changed: the prompt still decides what is drawn; sharing only decides that it is drawn
the same way in every image.

What each query sees (B images in a sharing group, N tokens each, keys/values K_j, V_j of image j)
- mode "all":    image i attends to [K_1 ... K_B] (its own tokens included); outputs stay per image.
- mode "anchor": the first A images (the anchors) attend to [K_1 ... K_A] only, so they come out
  exactly as if generated alone (as a batch of A with "all"); every other image i attends to
  [K_i, K_1 ... K_A]. More images can then be made consistent with a fixed set.
- mode "others": image i attends to the other images' tokens only, not its own. Intuition: an image
  can then only copy appearance from its mates, the strongest pull towards one subject (and the
  biggest risk of losing its own structure). Identical images stay unchanged.
- mode "pooled": image i attends to its own N tokens and to the other images' tokens average-pooled
  2x2 over the token grid. Intuition: appearance (colour, material) is smooth at that scale, layout
  detail is not needed from the others, and the extra keys cost a quarter.
- mode "mean": no concatenation at all; image i attends to its own N tokens, but its keys and values
  come from (mean over the group + 2 x own) / 3 of the layer input. Intuition: a cheap nudge of every
  image towards the group's average content, at the cost of plain attention. Identical images stay
  unchanged.
- strength s: an additive bias on the logits of the other images' keys (own keys get 0). s = 0 is
  plain concatenation; s < 0 weakens the pull of the other images (-inf switches it off); s > 0
  strengthens it.

Subject-aware options (the best training-free methods' knobs; kernels.py's gathered kernel, masks.py):
- subjects: of the other images, a query sees only the tokens that show a subject, read from the
  cross-attention of the subject's words (an Otsu-thresholded map); its own image stays fully
  visible. Backgrounds are then not pulled together. No mask exists at the first model call, so
  sharing starts at the second. Not with "others" (a query could see nothing) or "mean".
  Several subjects each get their own mask (a token in two masks goes to the subject whose words it
  attends to more). "pooled" (ConsiStory's pooled masks): every query sees every subject's tokens of
  the others, so one character can copy another's appearance. "isolated": a query inside subject A's
  mask sees its own image and subject A's tokens of the others only; a query outside every mask sees
  its own image only. One character then never copies from another (kernels.attend_within_subjects).
- dropout p: each offered token of the other images is dropped with probability p, drawn anew at
  every model call from a generator seeded with the run's seed (the first image's seed of the batch),
  so runs reproduce. Dropped tokens are left out, not masked, so they cost nothing; layouts stay
  more varied. p = 0 is plain sharing. Not with "others" or "mean".
- AdaIN: before attending, every image's queries and keys get the per-channel mean and std (over its
  tokens) of the first image of its sharing group (the first anchor in anchor mode), so the
  images' attention statistics, and with them style, line up. Identical images stay unchanged.
  With isolated subjects, per subject: subject A's tokens get the statistics of subject A's tokens in
  the first image, and tokens of no subject keep theirs.

Anchors recorded in another run (a reference, reference.py): in anchor mode the anchors' keys and
values never depend on the other images, so they can be recorded in an earlier pass and offered to
later batches, whose images are then all non-anchors. Every option keeps its batch meaning there,
which is what makes an extended set equal the images made beside the anchors:
- subject words: a recorded anchor offers only its subject tokens; its mask is made from its own
  cross-attention while it is recorded (the mask of an image depends on that image alone), stored per
  layer and step, and sharing starts at the second step as in a batch.
- dropout: the anchors' offered tokens are dropped by the draw a batch [anchors; new images] would
  make: generator seeded with the first anchor's seed (the first image of that batch), one draw of
  (halves x (anchors + new images), tokens) per shared layer call, the anchors' rows used. With as
  many new images as the anchors' batch had non-anchors, these are the very tokens dropped there.
- AdaIN: the group's first image is the first anchor, so every new image's queries and keys (and the
  other anchors' recorded keys) get the first anchor's per-channel statistics, recorded with it.

A sharing group never crosses the classifier-free-guidance halves: with guidance a batch is
[unconditional images; conditional images] and each half is its own group, so the unconditional
prediction of one image is never mixed with conditional content of another. The number of halves
comes with every call (below); nothing here infers it from the batch size.

Cost: in a shared layer with "all", each query attends to B*N keys instead of N, so attention FLOPs
grow with the group size B (B times the plain layer, per image). Memory stays linear in B because the
concatenation is done by regrouping tensors, never by building a (B*N) x (B*N) mask or logits tensor.
Masks, dropout, "others" and "pooled" gather the tokens each image offers instead, so a query attends
to N + (what it is offered) keys.

How it reaches the model: the seam
----------------------------------
Per-call state travels as call arguments, never through attributes written during a run or hooks:
1. The guidance helper (ldm/models/diffusion/guidance.py) builds a `StepContext` for every model call
   (guidance halves, the step's place in the whole grid, the latent size; ldm/modules/step_context.py)
   and passes it as `apply_model(..., step=...)`; the UNet hands it to every transformer, which adds
   its token grid: each attention layer receives a `LayerCall`.
2. Every attention layer (`CrossAttention`, ldm/modules/attention.py) has a processor slot, which
   computes the call (plain attention by default), and a list of readers, which observe it.
3. `SharedAttention` (controller.py), entered as a `with` block, starts a `SharingRun` and puts a
   `SharingProcessor` in the slot of each selected `attn1`; with subject words it adds the run's mask
   reader to the mask levels' `attn2`. On exit the slots and reader lists are as before.
4. The processor asks `run.applies(step)` (window, strength -inf, masks made yet) and then
   `run.attend(q, k, v, call=..., layer=...)`, which applies transforms and picks the kernel.
References record with readers (reference.py, `AnchorRecorder`); the diffusers integration installs
diffusers processors that call the very same run (diffusers_processors.py).

Use
---
    with shared_attention(model, groups="up", mode="all", steps=(0.0, 0.6)):
        samples, _ = sampler.sample(...)

    with shared_attention(model, groups="up", subjects="chair", dropout=0.5, prompts=prompts, seed=42):
        ...  # `prompts`: the batch's prompts, to find the subject's tokens (or `subject_positions=`)

    with shared_attention(model, groups="up", subjects="man;dog", subject_sharing="isolated", prompts=prompts):
        ...  # two characters, each consistent with itself only

A step window needs the sampler's step, which the guidance helper passes; outside a sampler (a bare
UNet call) no step is known and the window is ignored.

Adding a mechanism
------------------
- A new option is a field of `SharedAttentionSettings` (settings.py): its check in `__post_init__`
  (field-named `InvalidValue`s, no coercion), its rules with other fields there too, its place in
  `from_values`, `from_text`/`to_text` and `as_metadata`/`from_metadata`. Front ends and the PNG
  metadata then carry it without further code.
- What it does to q, k, v before attention is a function in transforms.py; which keys a query sees is a
  kernel in kernels.py (all layouts (B, heads, N, d), guidance halves explicit). `SharingRun.attend`
  (run.py) chooses it from the settings. State that outlives one call (like the masks) lives in the
  run, is made fresh for each run, and tells calls apart by their `StepContext` object.
- What it receives from a call: `call.step.halves`, `call.step.progress` (None outside a sampler),
  `call.step.latent_size`, `call.grid` (the layer's token grid), the layer's module path. What it needs
  from other layers (e.g. cross-attention maps) it reads with a reader, never by changing their output.
- Tests: the kernel against a naive reference written for clarity (tests/test_shared_attention.py and
  tests/test_shared_attention_variants.py show how: loops over images and queries, explicit softmax),
  the invariants that must hold (identical images unchanged, halves never mixed, the option at its
  neutral value equals plain sharing), and parity of the diffusers processors on tiny weights
  (tests/test_shared_attention_diffusers.py).
"""
from ldm.sharing.controller import (SharedAttention, SharingProcessor, active_run, controller_for, shared_attention,
                                    subject_positions_for)
from ldm.sharing.layers import (PATHS, describe_layers, find_unet, group_names_of_tags, select_layers, selected_tags,
                                tagged_layers, valid_group_names)
from ldm.sharing.run import SharingRun
from ldm.sharing.settings import MAX_ABS_STRENGTH, MODE_INTUITIONS, MODES, SharedAttentionSettings, split_names

__all__ = [
    "SharedAttention", "SharingProcessor", "active_run", "controller_for", "shared_attention", "subject_positions_for",
    "PATHS", "describe_layers", "find_unet", "group_names_of_tags", "select_layers", "selected_tags",
    "tagged_layers", "valid_group_names", "SharingRun",
    "MAX_ABS_STRENGTH", "MODE_INTUITIONS", "MODES", "SharedAttentionSettings", "split_names",
]
