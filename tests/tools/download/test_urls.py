"""Source parsing: repo ids, Hugging Face and ModelScope URLs, and the source table's overrides."""

import pytest

from anima_trainer.tools.download import sources
from anima_trainer.tools.download.urls import SourceRef, parse_source

CP2 = "nvidia/Cosmos-Predict2-2B-Text2Image"
NV = "nv-community/Cosmos-Predict2-2B-Text2Image"


@pytest.mark.parametrize("spec, expected", [
    # sd-scripts-anima's own test cases (seed_system.md §7)
    ("google/t5-v1_1-base", SourceRef("hf", "google/t5-v1_1-base", "main", "tokenizer", False, False)),
    (f"https://huggingface.co/{CP2}/tree/main/tokenizer", SourceRef("hf", CP2, "main", "tokenizer", False, True)),
    (f"https://www.modelscope.cn/models/{NV}/tree/master/tokenizer",
     SourceRef("modelscope", NV, "master", "tokenizer", False, True)),
    # more Hugging Face forms
    (f"https://huggingface.co/{CP2}", SourceRef("hf", CP2, "main", "tokenizer", False, False)),
    (f"https://huggingface.co/{CP2}/tree/v1.0", SourceRef("hf", CP2, "v1.0", "", False, True)),  # the root
    (f"https://hf.co/{CP2}/tree/main/text_encoder/sub/", SourceRef("hf", CP2, "main", "text_encoder/sub", False, True)),
    (f"https://huggingface.co/{CP2}/blob/main/tokenizer/spiece.model",
     SourceRef("hf", CP2, "main", "tokenizer/spiece.model", True, True)),
    (f"https://huggingface.co/{CP2}/resolve/refs%2Fpr%2F3/a%20b/x.json?download=true",
     SourceRef("hf", CP2, "refs/pr/3", "a b/x.json", True, True)),
    ("https://huggingface.co/t5-base/tree/main", SourceRef("hf", "t5-base", "main", "", False, True)),
    ("hf:owner/name", SourceRef("hf", "owner/name", "main", "tokenizer", False, False)),
    # ModelScope: a bare URL or id gets ModelScope's `master` (sd-scripts-anima gave it `main`)
    (f"https://www.modelscope.cn/models/{NV}", SourceRef("modelscope", NV, "master", "tokenizer", False, False)),
    (f"https://modelscope.cn/models/{NV}/files", SourceRef("modelscope", NV, "master", "tokenizer", False, False)),
    (f"ms:{NV}", SourceRef("modelscope", NV, "master", "tokenizer", False, False)),
    (f"modelscope:{NV}", SourceRef("modelscope", NV, "master", "tokenizer", False, False)),
    (f"https://www.modelscope.cn/models/{NV}/resolve/master/tokenizer/spiece.model",
     SourceRef("modelscope", NV, "master", "tokenizer/spiece.model", True, True)),
    (f"https://www.modelscope.cn/models/{NV}/file/view/v2/tokenizer/tokenizer.json",
     SourceRef("modelscope", NV, "v2", "tokenizer/tokenizer.json", True, True)),
    (f"https://www.modelscope.cn/models/{NV}/tree/master/tokenizer?Revision=v1.1",
     SourceRef("modelscope", NV, "v1.1", "tokenizer", False, True)),
    # FilePath= names a file (sd-scripts-anima took its parent as the subfolder)
    (f"https://www.modelscope.cn/api/v1/models/{NV}/repo?Revision=v3&FilePath=tokenizer/spiece.model",
     SourceRef("modelscope", NV, "v3", "tokenizer/spiece.model", True, True)),
    (f"https://www.modelscope.cn/models/{NV}?filepath=tokenizer/config.json",
     SourceRef("modelscope", NV, "master", "tokenizer/config.json", True, True)),
])
def test_parse_source(spec, expected):
    assert parse_source(spec, default_path="tokenizer") == expected


def test_a_file_url_gives_its_folder_to_folder_downloads():
    ref = parse_source(f"https://huggingface.co/{CP2}/blob/main/tokenizer/spiece.model")
    assert ref.is_file and ref.path == "tokenizer/spiece.model" and ref.folder() == "tokenizer"
    assert parse_source(f"https://huggingface.co/{CP2}/blob/main/config.json").folder() == ""
    assert parse_source(f"https://huggingface.co/{CP2}/tree/main/tokenizer").folder() == "tokenizer"


@pytest.mark.parametrize("spec, message", [
    ("", "the source is empty"),
    ("   ", "the source is empty"),
    ("a/b/c", "'a/b/c' is not a repo id"),
    ("owner/na me", "is not a repo id"),
    ("https://example.com/a/b", "unsupported host 'example.com'"),
    ("ftp://huggingface.co/a/b", "only http(s) URLs"),
    ("https://huggingface.co/", "the URL names no repo"),
    ("https://huggingface.co/datasets/a/b", "only model repos can be downloaded, not datasets"),
    ("https://huggingface.co/a/b/tree", "no revision after '/tree/'"),
    ("https://huggingface.co/a/b/blob/main", "a /blob/ URL must name a file"),
    ("https://huggingface.co/a/b/discussions/3", "expected /tree/, /blob/ or /resolve/"),
    ("https://huggingface.co/a/b/tree/main/../x", "must not contain '.' or '..'"),
    ("https://www.modelscope.cn/a/b", "expected https://www.modelscope.cn/models/<owner>/<name>"),
    ("https://www.modelscope.cn/models/onlyowner", "expected https://www.modelscope.cn/models/<owner>/<name>"),
])
def test_parse_source_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_source(spec)


def test_table_sources_and_overrides(monkeypatch):
    dit = sources.primary_source(sources.DIT, env={})
    assert dit == SourceRef("hf", "circlestone-labs/Anima", "main",
                            "split_files/diffusion_models/anima-base-v1.0.safetensors", True, False)
    assert sources.is_default_file(sources.DIT, dit)
    assert sources.is_default_file(sources.DIT, SourceRef("modelscope", "x/y", "master",
                                                          "any/anima-base-v1.0.safetensors", True))
    assert sources.fallback_source(sources.DIT, env={}) is None  # no known ModelScope mirror of the Anima files
    t5 = sources.primary_source(sources.T5_TOKENIZER, env={})
    assert (t5.repo_id, t5.revision, t5.path) == ("google/t5-v1_1-base", "main", "tokenizer")
    assert sources.fallback_source(sources.T5_TOKENIZER, env={}) == SourceRef("modelscope", NV, "master",
                                                                              "tokenizer")
    # a mirror with the same layout: the table's file path; a folder URL: the table's file name in it
    mirror = sources.primary_source(sources.DIT, "someone/anima-mirror", env={})
    assert mirror.path == sources.DIT.path and mirror.is_file and not sources.is_default_file(sources.DIT, mirror)
    env = {"ANIMA_TRAINER_SOURCE_VAE": "https://huggingface.co/x/y/tree/dev/vae",
           "ANIMA_TRAINER_MODELSCOPE_VAE": "x/y-ms", "HF_ENDPOINT": "http://h/",
           "ANIMA_TRAINER_MODELSCOPE_ENDPOINT": "http://m"}
    assert sources.primary_source(sources.VAE, env=env) == SourceRef("hf", "x/y", "dev", "vae", False, True)
    assert sources.fallback_source(sources.VAE, env=env) == SourceRef(
        "modelscope", "x/y-ms", "master", sources.VAE.path, True, False)
    assert (sources.hf_endpoint(env), sources.modelscope_endpoint(env)) == ("http://h", "http://m")
    assert sources.primary_source(sources.QWEN_TOKENIZER, f"ms:{NV}", env={}).revision == "master"
    with pytest.raises(ValueError, match="the fallback must be a ModelScope repo"):
        sources.fallback_source(sources.VAE, "https://huggingface.co/x/y", env={})
