"""Retrieval drafting (REST): the suffix array and queries against brute force, the datastore's
files (atomic build, memory-mapped open, clear errors), the drafter's trees and exactness, and
``specdec datastore build`` with a tokenizer made in the test."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specdec
from conftest import VOCAB, random_prompt, reference, tiny_model
from specdec.cli import main
from specdec.drafter import Context, Feedback
from specdec.drafters.retrieval import Datastore, Retrieval, encode_corpus, read_corpus, suffix_array

docs_strategy = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=12), min_size=1, max_size=6).filter(
    lambda docs: any(docs)
)


def build(docs, path, vocab=4, **kwargs):
    return Datastore.build(docs, path, vocab_size=vocab, model_name="test", **kwargs)


def flat(docs):
    """The datastore's token layout: each non-empty document followed by the separator -1."""
    return [t for d in docs if d for t in [*d, -1]]


def brute_occurrences(docs, pattern):
    """Positions (in the flat layout) just after each occurrence of `pattern` inside one document."""
    found, offset = [], 0
    for d in (d for d in docs if d):
        for s in range(len(d) - len(pattern) + 1):
            if d[s : s + len(pattern)] == pattern:
                found.append(offset + s)
        offset += len(d) + 1
    return found


def paths(tree):
    """{token path of every node: score} -- a tree's content independent of node order."""
    return {tuple(tree.tokens[tree.path_to(i)].tolist()): float(tree.scores[i]) for i in range(len(tree))}


# ---- suffix array ------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-3, 3), max_size=60))
def test_suffix_array_matches_sorting(values):
    expected = sorted(range(len(values)), key=lambda i: values[i:])
    assert suffix_array(np.array(values, dtype=np.int64)).tolist() == expected


def test_suffix_array_long_repeats():
    values = np.array([1, 2] * 300 + [1] * 200 + [0])  # long common prefixes: many doubling rounds
    expected = sorted(range(values.size), key=lambda i: values[i:].tolist())
    assert suffix_array(values).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(docs_strategy)
def test_datastore_suffixes_sorted_with_document_ends(tmp_path_factory, docs):
    ds = build(docs, tmp_path_factory.mktemp("ds") / "store")
    tokens = flat(docs)
    assert ds.tokens.tolist() == tokens
    # Suffixes compare up to their document's end; the separator sorts below every token.
    def key(i):
        return tokens[i : tokens.index(-1, i) + 1]

    keys = [key(int(i)) for i in ds.suffixes]
    assert sorted(ds.suffixes.tolist()) == [i for i, t in enumerate(tokens) if t >= 0]
    assert keys == sorted(keys)


# ---- queries -----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(docs_strategy, st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(1, 4), st.integers(1, 5))
def test_retrieve_equals_brute_force(tmp_path_factory, docs, context, min_suffix, depth):
    ds = build(docs, tmp_path_factory.mktemp("ds") / "store")
    max_suffix = 6
    n, lo, hi = ds.longest_match(context, max_suffix, min_suffix)
    longest = 0
    for k in range(min_suffix, min(max_suffix, len(context)) + 1):
        if brute_occurrences(docs, context[-k:]):
            longest = k
    assert n == longest
    if not longest:
        assert lo == hi and len(ds.retrieve(context, max_suffix=max_suffix, min_suffix=min_suffix,
                                            max_matches=99, depth=depth)) == 0
        return
    starts = brute_occurrences(docs, context[-n:])
    assert sorted(ds.suffixes[lo:hi].tolist()) == starts
    # Every occurrence read (max_matches >= count): scores are exact continuation shares.
    tokens = flat(docs)
    conts = []
    for s in starts:
        cont = tokens[s + n : s + n + depth]
        conts.append(cont[: cont.index(-1)] if -1 in cont else cont)
    expected = {}
    for c in conts:
        for j in range(1, len(c) + 1):
            expected[tuple(c[:j])] = expected.get(tuple(c[:j]), 0) + 1 / len(conts)
    tree = ds.retrieve(context, max_suffix=max_suffix, min_suffix=min_suffix, max_matches=99, depth=depth)
    got = paths(tree)
    assert got.keys() == expected.keys()
    assert all(abs(got[p] - expected[p]) < 1e-12 for p in got)


def test_matches_never_cross_documents(tmp_path):
    ds = build([[1, 2, 3], [0, 1, 2, 0]], tmp_path / "ds")
    assert ds.longest_match([3, 0], 4, 2)[0] == 0  # "3 0" only spans the boundary
    assert ds.longest_match([2, 3, 0], 4, 1)[0] == 1  # falls back to "0", not "2 3 0"
    tree = ds.retrieve([5, 2, 3], max_suffix=4, min_suffix=2, max_matches=9, depth=4)
    assert len(tree) == 0  # "2 3" ends its document: nothing follows
    tree = ds.retrieve([1, 2], max_suffix=4, min_suffix=2, max_matches=9, depth=4)
    assert paths(tree) == {(3,): 0.5, (0,): 0.5}  # continuations stop at each document's end


def test_sampled_matches_are_spread_and_deterministic(tmp_path):
    docs = [[1, 2, 3]] * 30 + [[1, 2, 0]] * 10  # "1 2" continues 3 (75%) or 0 (25%)
    ds = build(docs, tmp_path / "ds")
    tree = ds.retrieve([1, 2], max_suffix=2, min_suffix=1, max_matches=8, depth=2)
    assert paths(tree) == {(0,): 0.25, (3,): 0.75}  # in proportion, not the first 8 rows
    assert paths(ds.retrieve([1, 2], max_suffix=2, min_suffix=1, max_matches=8, depth=2)) == paths(tree)


# ---- files -------------------------------------------------------------------------------
def test_build_is_atomic(tmp_path):
    def failing():
        yield [1, 2, 3]
        raise RuntimeError("tokenizer died")

    with pytest.raises(RuntimeError, match="tokenizer died"):
        build(failing(), tmp_path / "ds")
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        build([[1, 2], [7]], tmp_path / "ds")
    with pytest.raises(ValueError, match="no tokens"):
        build([[], []], tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []  # neither the datastore nor a temporary directory


def test_build_replaces_a_datastore_and_refuses_anything_else(tmp_path):
    build([[1, 2]], tmp_path / "ds")
    ds = build([[3, 3, 3]], tmp_path / "ds")
    assert ds.tokens.tolist() == [3, 3, 3, -1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no datastore"):
        build([[1]], tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        build([[1]], tmp_path / "file")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert build([[1]], tmp_path / "empty").tokens.tolist() == [1, -1]


def test_open_memory_maps(tmp_path):
    build([[1, 2, 3], [2, 3]], tmp_path / "ds", vocab=10, description="unit test")
    ds = Datastore.open(tmp_path / "ds")
    for arr in (ds.tokens, ds.suffixes):
        assert isinstance(arr.base, np.memmap) and not arr.flags.writeable
    assert ds.tokens.dtype == np.int32
    assert (ds.vocab_size, ds.model_name, ds.meta["documents"], ds.meta["description"]) == (10, "test", 2, "unit test")
    meta = json.loads((tmp_path / "ds" / "datastore.json").read_text())
    assert meta["num_tokens"] == 7 and meta["version"] == 1


def test_corrupt_datastores_name_the_file_and_the_fix(tmp_path):
    def fresh(name):
        return build([[1, 2, 3]], tmp_path / name).path

    with pytest.raises(FileNotFoundError, match="specdec datastore build"):
        Datastore.open(tmp_path / "nowhere")
    p = fresh("a")
    os.remove(p / "suffixes.npy")
    with pytest.raises(FileNotFoundError, match=r"suffixes\.npy.*specdec datastore build"):
        Datastore.open(p)
    p = fresh("b")
    data = (p / "tokens.npy").read_bytes()
    (p / "tokens.npy").write_bytes(data[: len(data) - 8])  # truncated
    with pytest.raises(ValueError, match=r"tokens\.npy.*corrupt.*specdec datastore build"):
        Datastore.open(p)
    p = fresh("c")
    (p / "datastore.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"datastore\.json.*unreadable"):
        Datastore.open(p)
    p = fresh("d")
    meta = json.loads((p / "datastore.json").read_text())
    (p / "datastore.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version 99.*specdec datastore build"):
        Datastore.open(p)
    p = fresh("e")
    np.save(p / "suffixes.npy", np.array([0, 1], dtype=np.int32))
    with pytest.raises(ValueError, match=r"suffixes\.npy.*expected 3"):
        Datastore.open(p)
    p = fresh("f")
    os.remove(p / "datastore.json")
    with pytest.raises(FileNotFoundError, match=r"datastore\.json is missing"):
        Datastore.open(p)


# ---- the drafter -------------------------------------------------------------------------
def test_vocab_mismatch_is_refused(tmp_path):
    drafter = Retrieval(build([[1, 2]], tmp_path / "ds", vocab=50).path)  # a directory works too
    with pytest.raises(ValueError, match=r"\(50 tokens\).*96 tokens.*specdec datastore build"):
        drafter.begin(tiny_model())
    Retrieval(build([[1, 2]], tmp_path / "ok", vocab=VOCAB)).begin(tiny_model())


def test_argument_validation(tmp_path):
    ds = build([[1, 2]], tmp_path / "ds")
    for bad in (dict(budget=0), dict(depth=0), dict(max_matches=0), dict(min_suffix=3, max_suffix=2),
                dict(min_suffix=0), dict(token_cost=-1.0)):
        with pytest.raises(ValueError, match="Retrieval"):
            Retrieval(ds, **bad)


def test_budget_keeps_the_most_frequent_nodes(tmp_path):
    docs = [[5, 6, 1, 2, 3]] * 6 + [[5, 6, 1, 4]] * 3 + [[5, 6, 7, 8]]
    ds = build(docs, tmp_path / "ds", vocab=10)
    full = Retrieval(ds, budget=99, token_cost=0).propose(Context(torch.tensor([9, 5, 6])))
    assert paths(full) == {(1,): 0.9, (1, 2): 0.6, (1, 2, 3): 0.6, (1, 4): 0.3, (7,): 0.1, (7, 8): 0.1}
    tree = Retrieval(ds, budget=4, token_cost=0).propose(Context(torch.tensor([9, 5, 6])))
    assert set(paths(tree)) == {(1,), (1, 2), (1, 2, 3), (1, 4)}
    for i in range(len(tree)):
        p = int(tree.parents[i])
        assert 0 <= tree.scores[i] <= (1 if p < 0 else tree.scores[p])
    assert tree.depths().max() <= 3
    shallow = Retrieval(ds, budget=99, token_cost=0).propose(Context(torch.tensor([9, 5, 6]), max_depth=1))
    assert set(paths(shallow)) == {(1,), (7,)}
    assert len(Retrieval(ds, token_cost=0).propose(Context(torch.tensor([9, 5, 6]), max_depth=0))) == 0
    assert len(Retrieval(ds, token_cost=0).propose(Context(torch.tensor([9, 9, 9])))) == 0  # no match


def test_tree_size_follows_the_verify_cost_and_feedback(tmp_path):
    docs = [[5, 6, 1, 2, 3, 4]] * 5 + [[5, 6, 7, 8, 9, 1]] * 5
    ds = build(docs, tmp_path / "ds", vocab=10)
    ctx = dict(input_ids=torch.tensor([5, 6]))
    flat_cost = Context(**ctx, verify_cost=lambda n: 1.0)  # verifying is free: take the budget
    steep = Context(**ctx, verify_cost=lambda n: 1.0 + 2.0 * n)
    assert len(Retrieval(ds, budget=6).propose(flat_cost)) == 6
    assert len(Retrieval(ds, budget=6).propose(steep)) == 0
    assert len(Retrieval(ds, budget=6, token_cost=0).propose(steep)) == 6  # a number overrides the curve
    drafter = Retrieval(ds, budget=10, token_cost=0.1)
    first = len(drafter.propose(Context(**ctx)))
    for _ in range(30):  # the target follows one of the two equally likely branches to its end
        tree = drafter.propose(Context(**ctx))
        drafter.update(Feedback(tree, tree.path_to(len(tree) - 1), torch.zeros(1)))
    assert drafter.calibration > 0.9 and len(drafter.propose(Context(**ctx))) >= first
    for _ in range(40):  # the target rejects everything
        tree = drafter.propose(Context(**ctx))
        drafter.update(Feedback(tree, [], torch.zeros(1)))
    assert len(drafter.propose(Context(**ctx))) < first


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_is_exact_and_accepts_retrieved_drafts(tmp_path, arch):
    model = tiny_model(arch)
    prompts = [random_prompt(seed, 6) for seed in range(4)]
    refs = [reference(model, p, 24) for p in prompts]
    # The corpus: the model's own greedy continuations of other prompts plus these, so the
    # context's suffix is found and the retrieved continuation is what the target says.
    corpus = [r[0].tolist() for r in refs] + [reference(model, random_prompt(s, 6), 24)[0].tolist() for s in (10, 11)]
    # ... and copies with a wrong token at position 16, so contexts before it retrieve two branches.
    corpus += [r[0, :16].tolist() + [(int(r[0, 16]) + 1) % VOCAB] + r[0, 17:].tolist() for r in refs]
    ds = build(corpus, tmp_path / "ds", vocab=VOCAB)
    branched = False
    for prompt, ref in zip(prompts, refs):
        for drafter in (Retrieval(ds, budget=8, depth=6), Retrieval(ds, budget=12, depth=6, token_cost=0)):
            stats = specdec.GenerationStats()
            out = specdec.generate(model, prompt, drafter, max_new_tokens=24, eos_token_id=[], guard=None, stats=stats)
            assert torch.equal(out, ref)
            assert stats.mean_accepted > 1
            branched |= any(not s.tree.is_chain and len(s.accepted_nodes) < len(s.tree) for s in stats.steps)
    assert branched  # some tree held a branch the target rejected
    # A datastore of unrelated text: drafts get rejected, the output is unchanged.
    junk = build([random_prompt(s, 40, VOCAB)[0].tolist() for s in range(20, 30)], tmp_path / "junk", vocab=VOCAB)
    drafter = Retrieval(junk, min_suffix=1, token_cost=0)
    for prompt, ref in zip(prompts, refs):
        out = specdec.generate(model, prompt, drafter, max_new_tokens=24, eos_token_id=[], guard=None)
        assert torch.equal(out, ref)


# ---- corpora and the CLI -----------------------------------------------------------------
def test_read_corpus(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "one", "turns": ["a", "b"]}\n\n{"text": "two", "turns": ["c"]}\n{"text": "three"}\n')
    assert list(read_corpus(jl)) == [["one"], ["two"], ["three"]]
    assert list(read_corpus(jl, ("text",), limit=2)) == [["one"], ["two"]]
    with pytest.raises(ValueError, match=r"c\.jsonl:4: a record needs field\(s\) text, turns .*--field"):
        list(read_corpus(jl, ("text", "turns")))
    txt = tmp_path / "c.txt"
    txt.write_text("first line\nsecond line\n\n\nnext doc\n  \nlast")
    assert list(read_corpus(txt)) == [["first line\nsecond line"], ["next doc"], ["last"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="string or a list of strings"):
        list(read_corpus(bad))
    with pytest.raises(ValueError, match=r"\.jsonl or \.txt"):
        read_corpus(tmp_path / "c.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "none.jsonl")


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A word-level tokenizer with a chat template, and a config naming a padded vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    words = ["[UNK]", "<user>", "<bot>", "</s>"] + "the cat sat on a mat dog ran".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}{{ '<user>' if m['role'] == 'user' else '<bot>' }} {{ m['content'] }} </s> "
        "{% endfor %}{% if add_generation_prompt %}<bot> {% endif %}"
    )
    path = tmp_path / "tok"
    fast.save_pretrained(path)
    LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(path)
    return path


def test_encode_corpus_plain_and_chat(tokenizer_dir):
    from specdec.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    records = [["the cat sat", "a dog"], ["the mat"]]
    assert list(encode_corpus(tok, records)) == [[4, 5, 6], [8, 10], [4, 9]]
    chat = list(encode_corpus(tok, records, chat=True))
    assert chat == [[1, 4, 5, 6, 3, 2, 8, 10, 3], [1, 4, 9, 3, 2]]  # a user-final record asks for the answer


def test_cli_datastore_build(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"turns": t}) for t in (["the cat sat", "on a mat"], ["the dog ran"])))
    out = tmp_path / "store"
    args = ["datastore", "build", "--model", str(tokenizer_dir), "--corpus", str(corpus), "--out", str(out)]
    assert main(args + ["--field", "turns"]) == 0
    ds = Datastore.open(out)
    assert ds.tokens.tolist() == [4, 5, 6, -1, 7, 8, 9, -1, 4, 10, 11, -1]
    assert ds.vocab_size == 16  # the config's vocabulary, not the tokenizer's 12 words
    assert ds.model_name == str(tokenizer_dir) and "turns" in ds.meta["description"]
    assert main(args + ["--field", "turns", "--chat", "--limit", "1"]) == 0  # replaces the datastore
    assert Datastore.open(out).tokens.tolist() == [1, 4, 5, 6, 3, 2, 7, 8, 9, 3, -1]
    capsys.readouterr()
    assert main(args) == 2  # no "text" field
    assert "--field" in capsys.readouterr().err
    assert main(["datastore", "rebuild", "--corpus", str(corpus), "--out", str(out)]) == 2
    assert "unknown action" in capsys.readouterr().err
    assert main(["datastore", "build", "--out", str(out)]) == 2  # without --out: the model's default datastore
    assert "--corpus" in capsys.readouterr().err
    assert main(args[:-1] + [str(tokenizer_dir)] + ["--field", "turns"]) == 2  # not a datastore directory
    assert "holds no datastore" in capsys.readouterr().err
    assert Datastore.open(out).meta["documents"] == 1  # the failed runs left it alone
