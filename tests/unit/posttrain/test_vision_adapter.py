"""Adapter training (paper §7): the text model stays bitwise frozen, only the adapter trains, the
zero-gate adapter is the text model exactly, and the trained adapter round-trips through a checkpoint."""

import pytest
import torch

from herd.model.mllama_io import load_mllama, save_mllama
from herd.posttrain.config import FinetuneOptimConfig
from herd.posttrain.vision_adapter import (
    ADAPTER_PREFIXES, Example, adapter_optimizer, attach_adapter, caption_examples, example_loss, freeze_text_model,
    init_adapter_outputs, picture_set, qa_examples, text_state, tiny_vision_args, train_stage,
)

pytest.importorskip("PIL")


@pytest.fixture
def text_model(tiny_model):
    return tiny_model(seed=1, n_layers=4).eval()


@pytest.fixture(scope="module")
def pics():
    return picture_set(8, seed=0, size=56, vision=tiny_vision_args())


def _adapter(text_model):
    model = attach_adapter(text_model, tiny_vision_args(), n_cross_layers=2, seed=0)
    freeze_text_model(model)
    return model


def test_zero_gate_adapter_is_the_text_model(text_model, pics, tok):
    model = _adapter(text_model)
    assert model.args.fusion_schedule == [1, 3]
    prompt = torch.tensor([tok.encode("a text-only prompt", bos=True, eos=False)])
    with torch.no_grad():
        want = text_model(prompt)
        alone = model(prompt)  # no images: the cross layers are skipped
        # images attached and every token allowed to see them: tanh(0) gates still add nothing
        im = pics.images
        seen = model(prompt, images=im.pixel_values[:1], aspect_ratio_ids=im.aspect_ratio_ids[:1],
                     aspect_ratio_mask=im.aspect_ratio_mask[:1],
                     cross_attention_mask=torch.ones(1, prompt.shape[1], 1, 1, dtype=torch.long))
    torch.testing.assert_close(alone, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen, want, atol=1e-6, rtol=0)
    # the image token is the first id past this (non-Llama-3) vocabulary, embedded by the new rows
    assert model.args.text.vocab_size == 512
    assert model.text_model.embed(torch.tensor([[512]])).shape == (1, 1, 32)


def test_trainable_set_is_exactly_the_adapter(text_model):
    model = _adapter(text_model)
    opt = adapter_optimizer(model, FinetuneOptimConfig(lr=1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_opt}
    adapter = {n for n, _ in model.named_parameters() if n.startswith(ADAPTER_PREFIXES)}
    assert names == adapter
    assert any(n.endswith("gate_attn") for n in names) and any(n.startswith("vision_model.") for n in names)
    assert not any(n.startswith(("text_model.layers.", "text_model.tok_embeddings", "text_model.output",
                                 "text_model.norm")) for n in names)
    # every text-model tensor is one of the frozen ones
    assert set(text_state(model)) == {n for n in model.state_dict() if n not in adapter}


def test_training_leaves_text_weights_bitwise_unchanged_and_lowers_the_loss(text_model, pics, tok):
    model = _adapter(text_model)
    before = text_state(model)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = caption_examples(pics, tok, image_token=512)
    cfg = FinetuneOptimConfig(lr=1e-2, steps=20, batch_size=4, warmup_steps=1, weight_decay=0.1)
    first = example_loss(model, examples, pics, pad_id=tok.eos_id).loss.item()
    result = train_stage(model, examples, pics, cfg, pad_id=tok.eos_id, name="captions", log=None)
    with torch.no_grad():
        last = example_loss(model, examples, pics, pad_id=tok.eos_id).loss.item()
    assert last < first - 1.0, (first, last, result.losses)  # nats per caption token
    after = text_state(model)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    # and the adapter itself did train, gates included (weight decay would also have moved a frozen tensor)
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])}
    assert "text_model.cross_attention_layers.0.gate_attn" in moved
    assert any(n.startswith("vision_model.vision_encoder.") for n in moved)


def test_loss_is_on_the_targets_only(text_model, pics, tok):
    model = _adapter(text_model)
    examples = qa_examples(pics, tok, image_token=512, seed=0)[:3]
    out = example_loss(model, examples, pics, pad_id=tok.eos_id)
    assert out.num_targets == sum(len(e.target) for e in examples)
    # reference: each example alone, unpadded, scored by hand on its answer tokens
    total = 0.0
    with torch.no_grad():
        for e in examples:
            seq = torch.tensor([e.prompt + e.target])
            im = pics.images
            i = e.picture
            mask = torch.ones(1, seq.shape[1], 1, 1, dtype=torch.long)  # image first: every token sees it
            logits = model(seq, images=im.pixel_values[i:i + 1], aspect_ratio_ids=im.aspect_ratio_ids[i:i + 1],
                           aspect_ratio_mask=im.aspect_ratio_mask[i:i + 1], cross_attention_mask=mask)
            n = len(e.prompt)
            logp = logits[0].log_softmax(-1)
            total -= sum(logp[n - 1 + j, t].item() for j, t in enumerate(e.target))
    assert out.loss.item() == pytest.approx(total / out.num_targets, rel=1e-5)


def test_trained_adapter_checkpoint_reloads(text_model, pics, tok, tmp_path):
    model = _adapter(text_model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # stands in for training: gates and adapter non-zero
    path = save_mllama(model, tmp_path / "adapter")
    again = load_mllama(path, dtype=torch.float32)
    assert model.state_dict().keys() == again.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    seq = torch.tensor([[512] + tok.encode("hi", bos=True, eos=False)])
    im = pics.images
    kw = dict(images=im.pixel_values[:1], aspect_ratio_ids=im.aspect_ratio_ids[:1],
              aspect_ratio_mask=im.aspect_ratio_mask[:1],
              cross_attention_mask=torch.ones(1, seq.shape[1], 1, 1, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(model(seq, **kw), again(seq, **kw))


def test_attach_refuses_a_non_text_model():
    with pytest.raises(ValueError, match="herd text Transformer"):
        attach_adapter(torch.nn.Linear(2, 2), tiny_vision_args(), n_cross_layers=1)  # type: ignore[arg-type]


def test_blind_accuracy_is_the_majority_answer_rate():
    from herd.posttrain.vision_adapter import blind_accuracy

    pics = picture_set(40, seed=3, size=56, vision=tiny_vision_args())
    # evaluated on its own training pictures, the most common answer per question scores at least
    # 1 / (number of distinct answers) of each question's pairs, and never 100% on varied scenes
    acc = blind_accuracy(pics, pics, seed=0)
    assert 0.2 < acc < 1.0


def test_evaluation_is_greedy_decoding(text_model, pics, tok):
    from herd.posttrain.vision_adapter import evaluate

    model = _adapter(text_model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate_attn", "gate_ffwd")):
                p.fill_(0.5)  # let the image change the answer
    two = picture_set(2, seed=5, size=56, vision=tiny_vision_args())
    acc = evaluate(model, tok, two, seed=0, n_samples=2)
    # reference: argmax of a full forward pass, one token at a time
    caps = caption_examples(two, tok, image_token=512)
    max_new = max(len(e.target) for e in caps) + 2
    im = two.images
    for (truth, got), e in zip(acc.samples, caps):
        seq, new = list(e.prompt), []
        with torch.no_grad():
            for _ in range(max_new):
                x = torch.tensor([seq])
                i = e.picture
                logits = model(x, images=im.pixel_values[i:i + 1], aspect_ratio_ids=im.aspect_ratio_ids[i:i + 1],
                               aspect_ratio_mask=im.aspect_ratio_mask[i:i + 1],
                               cross_attention_mask=torch.ones(1, len(seq), 1, 1, dtype=torch.long))
                t = int(logits[0, -1].argmax())
                if t == tok.eos_id:
                    break
                new.append(t)
                seq.append(t)
        assert truth == e.truth and got == tok.decode(new).strip()


def test_training_refuses_an_unfrozen_text_model(text_model, pics, tok):
    model = attach_adapter(text_model, tiny_vision_args(), n_cross_layers=2)  # not frozen
    with pytest.raises(ValueError, match="freeze_text_model"):
        train_stage(model, caption_examples(pics, tok, 512), pics, FinetuneOptimConfig(lr=1e-3, steps=1),
                    pad_id=tok.eos_id, name="captions", log=None)
    with pytest.raises(ValueError, match="n_cross_layers must be in 1..4"):
        attach_adapter(text_model, tiny_vision_args(), n_cross_layers=5)



def test_the_picture_reaches_the_caption_tokens(text_model, pics, tok):
    """Pixels, aspect-ratio ids and masks and the cross-attention mask get through to the caption
    positions of `example_loss`'s batch: two pictures give two losses once the adapter writes into
    the text model, one loss while it cannot; and the encoder's patch weights get a gradient only then."""
    model = _adapter(text_model)
    examples = caption_examples(pics, tok, image_token=512)[:1]
    other = [Example(examples[0].prompt, examples[0].target, examples[0].truth, 1)]  # same text, picture 1
    assert pics.scenes[0].caption() != pics.scenes[1].caption()
    patch = model.vision_model.vision_encoder.conv1._linear.weight

    def loss_and_grad(ex):
        model.zero_grad()
        out = example_loss(model, ex, pics, pad_id=tok.eos_id).loss
        out.backward()
        return out.item(), patch.grad.abs().sum().item()

    shut = [loss_and_grad(e) for e in (examples, other)]
    assert shut[0][0] == shut[1][0] and shut[0][1] == 0.0  # gates at 0: the picture cannot matter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate_attn", "gate_ffwd")) and n.startswith("text_model."):
                p.fill_(0.5)
    opened = [loss_and_grad(e) for e in (examples, other)]
    assert abs(opened[0][0] - opened[1][0]) > 1e-6 and opened[0][1] > 0.0  # bitwise equal would be a broken path


def test_adapter_init_keeps_the_text_model_and_gives_every_weight_a_gradient(text_model, pics, tok):
    """init_adapter_outputs: still exactly the text model (zero output projections), gates open, what
    reaches wo / w2 as large as the residual stream, and a gradient for the encoder from step one
    (with Meta's zero gates only the gates get one)."""
    model = _adapter(text_model)
    examples = caption_examples(pics, tok, image_token=512)
    prompt = torch.tensor([tok.encode("a text-only prompt", bos=True, eos=False)])
    seen = init_adapter_outputs(model, examples, pics, pad_id=tok.eos_id)
    im = pics.images
    with torch.no_grad():
        want = text_model(prompt)
        got = model(prompt, images=im.pixel_values[:1], aspect_ratio_ids=im.aspect_ratio_ids[:1],
                    aspect_ratio_mask=im.aspect_ratio_mask[:1],
                    cross_attention_mask=torch.ones(1, prompt.shape[1], 1, 1, dtype=torch.long))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for block, rms in zip(model.text_model.cross_attention_layers.values(), seen):
        assert block.gate_attn.item() == 1.0 and not block.attention.wo.weight.any()
        assert rms["residual"] > 10 * rms["attention"]  # the N(0, 0.02) adapter is far below the text model's scale
        # what reaches wo is as large as the residual stream once a N(0, 0.02) projection of its width
        # (the init it replaced, gain 0.02 * sqrt(width)) is applied: its RMS ratio times that gain ~ 1
        x = {}
        hook = block.attention.wo.register_forward_hook(lambda m, args, out: x.setdefault("in", args[0]))
        with torch.no_grad():
            example_loss(model, examples, pics, pad_id=tok.eos_id)
        hook.remove()
        ratio = x["in"].pow(2).mean().sqrt().item() / rms["residual"] * 0.02 * x["in"].shape[-1] ** 0.5
        assert 0.5 < ratio < 2, ratio
    model.zero_grad()
    example_loss(model, examples, pics, pad_id=tok.eos_id).loss.backward()
    assert model.vision_model.vision_encoder.conv1._linear.weight.grad.abs().sum() == 0  # wo is 0: nothing yet
    assert all(b.attention.wo.weight.grad.abs().sum() > 0 for b in model.text_model.cross_attention_layers.values())


def _colour_task(tok, n: int, seed: int):
    """One shape per picture; the target is its colour's name: a one-attribute task (chance 1/6)."""
    from herd.posttrain.picture_data import draw, make_scenes
    from herd.posttrain.vision_adapter import CAPTION_PROMPT, PictureSet
    from herd.model.vision_preprocess import preprocess_images

    scenes = make_scenes(n, seed=seed, size=56, max_items=1, digit_share=0.0)
    pics = PictureSet(scenes, preprocess_images([[draw(s)] for s in scenes], tile_size=56, max_tiles=1))
    prompt = [512] + tok.encode(CAPTION_PROMPT, bos=True, eos=False)
    examples = [Example(prompt, tok.encode(" " + s.items[0].colour, bos=False, eos=True), s.items[0].colour, i)
                for i, s in enumerate(scenes)]
    return pics, examples


@pytest.mark.parametrize("seed", [0, 1])
def test_the_adapter_learns_a_colour_it_can_only_see(tiny_model, tok, seed):
    """The check the demo's flat captions lacked: a frozen text model that knows the words (trained
    on the colour names without pictures, so it can only guess), plus the recipe's adapter trained for
    120 steps, names the colour of held-out pictures' shape far above chance. With Meta's zero gates
    and the old rate (3e-3), the same 120 steps reached 20%, 41% and 30% (adapter seeds 0, 1, 2;
    the majority colour is 20%), all below what this asserts."""
    from herd.posttrain.picture_data import COLOURS

    train, examples = _colour_task(tok, 256, seed=0)
    held, held_examples = _colour_task(tok, 64, seed=1)
    text = tiny_model(seed=1, n_layers=4)
    rows = [e.prompt[1:] + e.target for e in examples]  # the text alone: prompt, colour, end of text
    x = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=tok.eos_id)
    opt = torch.optim.AdamW(text.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        b = x[torch.randint(0, len(rows), (32,), generator=g)]
        loss = torch.nn.functional.cross_entropy(text(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = attach_adapter(text.eval(), tiny_vision_args(), n_cross_layers=2, seed=seed)
    freeze_text_model(model)
    init_adapter_outputs(model, examples[:32], train, pad_id=tok.eos_id)
    cfg = FinetuneOptimConfig(lr=1e-3, weight_decay=0.0, steps=120, batch_size=16, warmup_steps=5, grad_clip=1.0,
                              seed=seed)
    train_stage(model, examples, train, cfg, pad_id=tok.eos_id, name="colours", log=None)
    # the colour names' first bytes differ, so the next-byte argmax among them is the model's colour
    firsts = torch.tensor([tok.encode(c, bos=False, eos=False)[0] for c in COLOURS])
    x = torch.tensor([e.prompt + e.target[:1] for e in held_examples])  # ... "picture: " then the colour
    im = held.images
    with torch.no_grad():
        logits = model(x, images=im.pixel_values, aspect_ratio_ids=im.aspect_ratio_ids,
                       aspect_ratio_mask=im.aspect_ratio_mask,
                       cross_attention_mask=torch.ones(len(held_examples), x.shape[1], 1, 1, dtype=torch.long))
    said = [list(COLOURS)[i] for i in logits[:, -1, firsts].argmax(-1).tolist()]
    truth = [e.truth for e in held_examples]
    accuracy = sum(a == b for a, b in zip(said, truth)) / len(truth)
    majority = max(truth.count(c) for c in COLOURS) / len(truth)
    assert majority < 0.3 and accuracy > 0.7, (accuracy, majority, said[:8])
