"""Metric functions against values computed by hand on small inputs (Chinese included)."""

import json
import math

import pytest

from vlmtune import metrics


def test_bleu_zh_counts_characters_with_exp_smoothing():
    # 我爱北京 vs 我爱上海 (characters): 1-grams 2/4, 2-grams 1/3, 3-grams 0/2, 4-grams 0/1;
    # 'exp' smoothing turns the k-th zero precision into 100 / (2^k * total): 25 and 25.
    expected = (50 * (100 / 3) * 25 * 25) ** 0.25
    assert metrics.bleu(["我爱北京"], [["我爱上海"]]) == pytest.approx(expected, rel=1e-6)
    assert metrics.bleu(["猫坐在垫子上"], [["猫坐在垫子上"]]) == pytest.approx(100)


def test_bleu_takes_a_varying_number_of_references_per_record():
    # Record 2 has two references, record 1 one; the matching one makes record 2 perfect.
    one = metrics.bleu(["我爱北京", "猫坐在垫子上"], [["我爱北京"], ["狗在跑", "猫坐在垫子上"]])
    assert one == pytest.approx(100)


def test_resampled_corpus_scores_equal_sacrebleus_corpus_scores():
    preds = ["我爱北京", "猫坐在垫子上", "今天天气很好"]
    refs = [["我爱上海"], ["狗在跑", "猫坐在垫子上"], ["明天天气很好"]]
    for name, direct in (("bleu", metrics.bleu), ("chrf", metrics.chrf)):
        of_records = metrics.corpus_statistic(name, preds, refs)
        assert of_records([0, 1, 2]) == pytest.approx(direct(preds, refs))
        assert of_records([0, 0, 2]) == pytest.approx(
            direct([preds[0], preds[0], preds[2]], [refs[0], refs[0], refs[2]])
        )


def test_chrf_extremes():
    assert metrics.chrf(["今天天气很好"], [["今天天气很好"]]) == pytest.approx(100)
    assert metrics.chrf(["甲乙丙"], [["丁戊己"]]) == pytest.approx(0)


def test_rouge_l_is_character_level_and_takes_the_best_reference():
    # LCS(我爱北京天安门, 我爱天安门) = 5 characters: P 5/7, R 5/5, F1 = 10/12.
    assert metrics.rouge_l("我爱北京天安门", ["我爱天安门"]) == pytest.approx(100 * 10 / 12)
    assert metrics.rouge_l("我爱北京天安门", ["完全不同", "我爱天安门"]) == pytest.approx(100 * 10 / 12)
    # Blanks are not characters of the text.
    assert metrics.rouge_l("我 爱", ["我爱"]) == pytest.approx(100)


def test_words_are_jiebas():
    assert metrics.words("我爱北京天安门") == ["我", "爱", "北京", "天安门"]


def test_distinct_n_over_jieba_words():
    tokens = [metrics.words("我爱北京天安门"), metrics.words("我爱北京")]
    # 1-grams: 我 爱 北京 天安门 我 爱 北京 -> 4 distinct of 7.
    assert metrics.distinct(tokens, 1) == pytest.approx(4 / 7)
    # 2-grams: 我爱 爱北京 北京天安门 我爱 爱北京 -> 3 distinct of 5.
    assert metrics.distinct(tokens, 2) == pytest.approx(3 / 5)
    assert metrics.distinct([[]], 2) == 0.0


def test_cider_d_by_hand():
    # Two records whose references share no word: every n-gram of record 1 has document
    # frequency 1, idf = log(2) - log(1) for all of them; a hypothesis equal to its reference
    # has cosine 1 and no length penalty for each n with n-grams, so CIDEr-D = 10 * (orders
    # with n-grams) / 4. 我爱北京天安门 has 4 words (n = 1..4): 10; 猫跑 (猫, 跑) has 2: 5.
    corpus, scores = metrics.cider_d(["我爱北京天安门", "猫跑"], [["我爱北京天安门"], ["猫跑"]])
    assert scores == pytest.approx([10.0, 5.0])
    assert corpus == pytest.approx(7.5)
    _, disjoint = metrics.cider_d(["今天下雨", "猫跑"], [["我爱北京天安门"], ["猫跑"]])
    assert disjoint[0] == pytest.approx(0.0)


def test_preference_pairs_use_loss_per_token_and_skip_unstarred_and_equal_stars():
    refs = [
        dict(star=10, nll=5.0, tokens=5),  # 1.0 per token
        dict(star=3, nll=8.0, tokens=4),  # 2.0: lower star, higher loss -> correct
        dict(star=20, nll=9.0, tokens=3),  # 3.0: highest star, highest loss -> wrong twice
        dict(star=None, nll=0.1, tokens=1),  # unstarred: not compared
        dict(star=3, nll=2.0, tokens=1),  # same star as the second: that pair is skipped
    ]
    pairs = metrics.preference_pairs(refs)
    # (10,3) ok, (10,20) wrong, (10,3') ok, (3,20) wrong, (20,3') wrong -- (3,3') skipped.
    assert sorted(pairs) == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert metrics.preference_pairs([dict(star=5, nll=2.0, tokens=2), dict(star=1, nll=1.0, tokens=1)]) == [
        0.5
    ]


def test_bootstrap_interval_brackets_the_mean_and_needs_two_units():
    values = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    lo, hi = metrics.bootstrap_ci(len(values), lambda i: sum(values[k] for k in i) / len(i), 500, 0)
    assert 0.0 <= lo < 5 / 8 < hi <= 1.0
    assert metrics.bootstrap_ci(1, lambda i: 1.0, 500, 0) is None
    assert metrics.bootstrap_ci(4, lambda i: 2.0, 100, 0) == [2.0, 2.0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_score_writes_overall_and_per_type_metrics(tmp_path):
    refs = lambda *texts_stars: [dict(text=t, star=s) for t, s in texts_stars]  # noqa: E731
    preds = [
        dict(
            id="a",
            type="I2T",
            prediction="我爱北京天安门",
            references=refs(("我爱北京天安门", 9), ("今天下雨", 2)),
        ),
        dict(id="b", type="T2T", prediction="小猫咪,你的猫爪好臭啊", references=refs(("猫爪好臭", None))),
        dict(id="c", type="I2T", prediction="", references=refs(("钱包:我已经尽力了。", 1))),
    ]
    nll = [
        dict(id="a", references=[dict(star=9, nll=2.0, tokens=2), dict(star=2, nll=6.0, tokens=2)]),
        dict(id="b", references=[dict(star=None, nll=3.0, tokens=1)]),
        dict(id="c", references=[dict(star=1, nll=1.0, tokens=1)]),
    ]
    train = [
        dict(
            id=0,
            image="x.jpg",
            conversations=[
                {"from": "human", "value": "<image>\nq"},
                {"from": "gpt", "value": "小猫咪, 你的猫爪好臭啊"},
            ],
        )
    ]
    write_jsonl(tmp_path / "p.jsonl", preds)
    write_jsonl(tmp_path / "n.jsonl", nll)
    (tmp_path / "train.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    res = metrics.score(
        tmp_path / "p.jsonl", tmp_path / "m.json", tmp_path / "n.jsonl", tmp_path / "train.json", 200, 0
    )
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == res
    o = res["overall"]
    assert res["records"] == 3 and set(res["by_type"]) == {"I2T", "T2T"}
    assert o["train_copy_rate"]["value"] == pytest.approx(
        1 / 3
    )  # b repeats a training response (blanks ignored)
    assert o["empty_rate"]["value"] == pytest.approx(1 / 3)
    assert o["prediction_chars"]["value"] == pytest.approx((7 + 11 + 0) / 3)
    assert o["prediction_chars"]["median"] == 7 and o["prediction_chars"]["max"] == 11
    # NLL per reference token: (2 + 6 + 3 + 1) / (2 + 2 + 1 + 1) = 2; perplexity e^2.
    assert o["reference_nll"]["value"] == pytest.approx(2.0)
    assert o["reference_perplexity"]["value"] == pytest.approx(math.exp(2.0))
    # One starred pair (a: star 9 at 1.0/token beats star 2 at 3.0/token).
    assert o["preference_accuracy"] == dict(value=1.0, n=1, unit="pair", ci95=None)
    assert o["bleu"]["ci95"] is not None and o["bleu"]["ci95"][0] <= o["bleu"]["ci95"][1]
    i2t = res["by_type"]["I2T"]
    assert i2t["records"] == 2
    assert i2t["metrics"]["rouge_l"]["value"] == pytest.approx((100 + 0) / 2)


def test_score_names_a_record_without_nll(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [dict(id="a", prediction="x", references=[dict(text="y", star=1)])])
    write_jsonl(tmp_path / "n.jsonl", [dict(id="other", references=[])])
    with pytest.raises(metrics.MetricsError, match=r"no reference NLL for records \['a'\]"):
        metrics.score(tmp_path / "p.jsonl", tmp_path / "m.json", tmp_path / "n.jsonl")
    assert not (tmp_path / "m.json").exists()
