"""The researcher agent, run as a real process behind a real broker.

It finds the right document of a small corpus (``fixtures/corpus``: one topic per file)
for questions worded unlike the documents, and cites it; it reads a corpus carried by
the task or a directory configured on its machine, indexed incrementally; hostile query
syntax does not make it fail; without a corpus it says how to give one.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from agent_sdk import SyncClient
from agents.researcher import TASK_INDEX_CACHE, Corpora, sentence_units
from agents.search_index import SearchIndex, fts_query, split_passages, words
from tests.conftest import Cluster
from tests.fakes.llm_server import ErrorReply, FakeLLMServer, TextReply

AGENT = "agents.researcher:ResearcherAgent"
CORPUS = Path(__file__).parent / "fixtures" / "corpus"
#: Deadline of every task of these tests.
RESULT_TIMEOUT_S = 20.0

#: (question worded unlike the document, the document that answers it)
QUESTIONS = [
    ("why do ocean reefs lose their colour when the sea warms", "coral_reefs.md"),
    ("how do bees turn flower nectar into honey", "beekeeping.md"),
    ("a network sender cuts its rate after packets are lost", "tcp_congestion.md"),
    ("rising dough with a wild yeast culture", "sourdough.md"),
    ("automatic reclamation of unreachable objects in memory", "garbage_collection.md"),
    ("how many weeks to prepare for running 42 km, and what is hitting the wall",
     "marathon_training.md"),
]


def corpus_documents(prefix: str = "docs/") -> list[dict[str, str]]:
    """The fixture corpus as a task carries it."""
    return [{"path": prefix + p.name, "content": p.read_text(encoding="utf-8")}
            for p in sorted(CORPUS.iterdir())]


def researcher(cluster: Cluster, **env: str) -> SyncClient:
    """A broker, one researcher process (with ``env``), and a client of the broker."""
    url = cluster.broker().url
    cluster.agent(url, AGENT, wait=True, **env)
    return cluster.client(url)


def ask(client: SyncClient, capability: str, data: dict[str, Any]) -> dict[str, Any]:
    """Run one task on the researcher; its result's data (the task must succeed)."""
    result = client.submit(capabilities=[capability], data=data,
                           timeout=RESULT_TIMEOUT_S).result(timeout=RESULT_TIMEOUT_S)
    assert result.ok, result
    assert isinstance(result.data, dict)
    return result.data


def assert_citations_hold(summary: str, citations: list[dict[str, Any]],
                          contents: dict[str, str]) -> None:
    """Every citation names a real line range, and every sentence the summary quotes
    before a citation is found in the lines it cites."""
    assert citations, summary
    for citation in citations:
        first, last = citation["lines"]
        lines = contents[citation["path"]].splitlines()
        assert 1 <= first <= last <= len(lines), citation
        marker = f"[{citation['path']}:{first}-{last}]"
        assert marker in summary, (marker, summary)
        quoted = summary.split(marker)[0].rsplit("]", 1)[-1].strip()
        cited_text = " ".join(" ".join(lines[first - 1:last]).split())
        assert quoted and quoted.rstrip("…") in cited_text, (quoted, cited_text)


# ------------------------------------------------------------------ through the broker

def test_finds_the_right_document_for_each_question_and_cites_it(cluster: Cluster) -> None:
    # Given a researcher and the corpus carried with each research item
    client = researcher(cluster)
    documents = corpus_documents()
    contents = {d["path"]: d["content"] for d in documents}
    for number, (question, expected) in enumerate(QUESTIONS):
        # When it researches a question worded unlike the document that answers it
        data = ask(client, "search", {"query": question, "aspect": "overview",
                                      "topic": "fixtures", "documents": documents})
        # Then the best result is that document, and the summary quotes and cites it
        assert data["results"][0]["path"] == "docs/" + expected, (question, data["results"])
        assert data["citations"][0]["path"] == "docs/" + expected, data["citations"]
        assert {c["path"] for c in data["citations"]} == {"docs/" + expected}, data["summary"]
        assert_citations_hold(data["summary"], data["citations"], contents)
        for hit in data["results"]:
            first, last = hit["lines"]
            assert 1 <= first <= last <= len(contents[hit["path"]].splitlines())
            assert hit["score"] > 0
        assert [h["score"] for h in data["results"]] == \
            sorted((h["score"] for h in data["results"]), reverse=True)
        # And the item's own fields travel on, the carried documents do not
        assert data["kind"] == "research" and data["aspect"] == "overview"
        assert data["query"] == question and "documents" not in data
        # And the same documents are indexed once (cached by content hash)
        assert data["corpus"]["source"] == "task" and data["corpus"]["documents"] == 11
        assert data["corpus"]["cached"] is (number > 0)


def test_words_only_in_code_or_tables_are_not_an_answer(cluster: Cluster) -> None:
    # Given documents that name "vector databases" only in a command example and a table
    # row, and one that discusses them in prose
    client = researcher(cluster)
    usage = ("# Usage\n\nRun a research workflow from the shell:\n\n```bash\n"
             "orchestrator submit \"Research vector databases\"\n```\n\n"
             "| text | plan |\n| --- | --- |\n| research vector databases | a workflow |\n"
             "\n  research.py      the vector databases listing, column-aligned\n")
    prose = ("# Storage\n\nVector databases index embeddings for nearest-neighbour search. "
             "They trade exact recall for speed with approximate indexes.\n")
    only_code = [{"path": "docs/usage.md", "content": usage}]
    # When only the command example names them
    data = ask(client, "search", {"query": "vector databases", "aspect": "overview",
                                  "documents": only_code})
    # Then nothing is quoted, the summary says why and where the nearest mention is
    assert data["summary_by"] == "none", data
    assert data["summary"].startswith("No passage of the 1 document(s) is about "
                                      "'vector databases'"), data["summary"]
    assert "[docs/usage.md:" in data["summary"] and "orchestrator submit" not in data["summary"]
    # When a document discusses them: its sentence is quoted, never the command line
    data = ask(client, "search", {"query": "vector databases", "aspect": "overview",
                                  "documents": [*only_code,
                                                {"path": "docs/storage.md", "content": prose}]})
    assert data["summary_by"] == "extractive", data
    assert data["summary"].startswith("Vector databases index embeddings"), data["summary"]
    assert "orchestrator submit" not in data["summary"] and "|" not in data["summary"]


def test_an_aspect_query_quotes_only_sentences_about_its_topic(cluster: Cluster) -> None:
    # Given a document that shares one word of the topic ("database") but is not about
    # vector databases, and one that is
    client = researcher(cluster)
    other = ("# Migrations\n\nOpening an older database runs the migration steps, one "
             "transaction each, and the best practice is a backup first.\n")
    prose = ("# Storage\n\nVector databases index embeddings for nearest-neighbour search. "
             "A common pitfall of vector databases is a stale index after bulk writes.\n")
    item = {"query": "vector databases: best practices and common pitfalls",
            "aspect": "practices", "topic": "vector databases"}
    # When an aspect of the topic is researched in the first alone: nothing is an answer
    data = ask(client, "search", {**item, "documents": [
        {"path": "docs/migrations.md", "content": other}]})
    assert data["summary_by"] == "none" and "Opening an older database" not in data["summary"]
    # And with both: only the sentence about vector databases is quoted
    data = ask(client, "search", {**item, "documents": [
        {"path": "docs/migrations.md", "content": other},
        {"path": "docs/storage.md", "content": prose}]})
    assert data["summary_by"] == "extractive", data
    assert "stale index after bulk writes" in data["summary"], data["summary"]
    assert "Opening an older database" not in data["summary"]


def test_a_directory_corpus_is_indexed_incrementally(cluster: Cluster, tmp_path: Path,
                                                     orch_home: Path) -> None:
    # Given a corpus directory configured on the researcher's machine
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n")
    (corpus / "notes.txt").write_bytes(b"honey\0\1\2")
    url = cluster.broker().url
    agent = cluster.agent(url, AGENT, ORCH_RESEARCH_CORPUS=str(corpus))
    client = cluster.client(url)
    # When it is first searched, every file is indexed, in an SQLite file of its data dir
    first = ask(client, "search", {"query": "queen lays eggs in the hive"})
    assert first["corpus"]["source"] == "directory"
    assert first["corpus"]["index"]["added"] == sorted(p.name for p in CORPUS.iterdir())
    assert first["corpus"]["index"]["skipped"] == [
        {"path": "logo.png", "reason": "a binary file type"},
        {"path": "notes.txt", "reason": "binary (a NUL byte)"}]
    assert first["results"][0]["path"] == "beekeeping.md"
    assert list((orch_home / "researcher").glob("index-*.sqlite"))
    # When one file changes, one is added and one is deleted
    with (corpus / "volcanoes.md").open("a", encoding="utf-8") as f:
        f.write("\nIceland's fissure eruptions pour basalt from long cracks in the ground.\n")
    (corpus / "glaciers.md").write_text(
        "# Glaciers\n\nA glacier is ice that flows under its own weight, carving valleys.\n")
    (corpus / "chess_openings.md").unlink()
    second = ask(client, "search", {"query": "flowing ice carving valleys"})
    # Then only those are re-indexed or dropped, and searches see them
    index = second["corpus"]["index"]
    assert index["reindexed"] == ["glaciers.md", "volcanoes.md"], index
    assert index["added"] == ["glaciers.md"] and index["updated"] == ["volcanoes.md"]
    assert index["removed"] == ["chess_openings.md"] and index["unchanged"] == 9
    assert index["skipped"] == [] and index["not_indexed"] == 2
    assert second["corpus"]["documents"] == 11
    assert second["results"][0]["path"] == "glaciers.md"
    fissure = ask(client, "search", {"query": "Iceland fissure"})
    assert fissure["results"][0]["path"] == "volcanoes.md"
    new_line = (corpus / "volcanoes.md").read_text().splitlines().index(
        "Iceland's fissure eruptions pour basalt from long cracks in the ground.") + 1
    first_line, last_line = fissure["results"][0]["lines"]
    assert first_line <= new_line == last_line
    gone = ask(client, "search", {"query": "Sicilian Defence gambit"})
    assert all(hit["path"] != "chess_openings.md" for hit in gone["results"])
    # And a restarted researcher re-indexes nothing: the index outlives the process
    agent.kill()
    agent.wait(timeout=10)
    cluster.agent(url, AGENT, ORCH_RESEARCH_CORPUS=str(corpus))
    third = ask(client, "search", {"query": "flowing ice"})
    assert third["corpus"]["index"]["reindexed"] == [] and \
        third["corpus"]["index"]["unchanged"] == 11, third["corpus"]


def test_hostile_query_syntax_does_not_fail(cluster: Cluster) -> None:
    # Given a researcher and the corpus
    client = researcher(cluster)
    documents = corpus_documents()
    # When queries carry FTS5 syntax: quotes, NEAR, stars, parentheses, columns, operators
    for query in ['NEAR(honey bees, 2)', '"honey', 'honey*', '(bees OR) AND NOT', 'body:honey',
                  '^honey -bees + "" \' ( ) { } [ ] :', 'honey" OR "1"="1', 'AND', '***', '']:
        data = ask(client, "search", {"query": query, "documents": documents})
        # Then each is searched as plain words: the honey questions find the bees
        if "honey" in query:
            assert data["results"][0]["path"] == "docs/beekeeping.md", (query, data)
        else:
            assert isinstance(data["results"], list) and isinstance(data["summary"], str)


def test_without_a_corpus_the_result_says_how_to_give_one(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a researcher with no corpus directory, and a task carrying no documents
    monkeypatch.delenv("ORCH_RESEARCH_CORPUS", raising=False)
    client = researcher(cluster)
    data = ask(client, "search", {"query": "vector databases", "aspect": "overview"})
    # Then it succeeds, saying plainly there is nothing to search and how to give it
    assert data["corpus"] == {"documents": 0, "source": "none"}
    assert data["results"] == [] and data["citations"] == []
    assert "ORCH_RESEARCH_CORPUS" in data["summary"] and "documents" in data["summary"]
    assert data["aspect"] == "overview" and data["query"] == "vector databases"
    # And it advertises only what it serves: no web_search without a search backend
    (agent,) = client.status()["agents"]
    assert agent["name"] == "researcher"
    assert agent["capabilities"] == ["document_analysis", "search", "summarization"]


def test_a_configured_directory_that_is_missing_is_said_plainly(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    # Given a researcher whose corpus directory does not exist
    missing = tmp_path / "no-such-corpus"
    client = researcher(cluster, ORCH_RESEARCH_CORPUS=str(missing))
    # When it is asked to search, the task succeeds and says what to fix
    data = ask(client, "search", {"query": "honey"})
    assert data["corpus"] == {"documents": 0, "source": "none"} and data["results"] == []
    assert data["summary"] == (f"research corpus {missing} is not a directory: fix "
                               "ORCH_RESEARCH_CORPUS, or carry the documents with the task.")
    # And carried documents are still searched
    carried = ask(client, "search", {"query": "honey", "documents": corpus_documents()})
    assert carried["results"][0]["path"] == "docs/beekeeping.md"


def test_summarization_summarizes_each_file_with_citations(cluster: Cluster) -> None:
    # Given prose documents and a Python module
    module = ('"""Ledger of payments.\n\nMore text.\n"""\n\n'
              'def record(amount: int) -> None:\n    """Record one payment."""\n\n\n'
              'def _private() -> None:\n    pass\n\n\n'
              'class Ledger:\n    """All payments of an account."""\n')
    script = ("#!/usr/bin/env node\n// Serves the shop's pages.\n// Over HTTP.\n\n"
              "const port = 80;\nexport async function start(port) {\n}\n")
    files = corpus_documents()[:2] + [{"path": "src/ledger.py", "content": module},
                                      {"path": "web/app.js", "content": script}]
    contents = {f["path"]: f["content"] for f in files}
    client = researcher(cluster)
    # When the researcher summarizes them
    data = ask(client, "summarization", {"files": files})
    # Then each file has a summary whose every sentence is cited where it stands
    summaries = {s["path"]: s for s in data["summaries"]}
    assert list(summaries) == [f["path"] for f in files] and "files" not in data
    prose = {path: c for path, c in contents.items() if path.endswith(".md")}
    for path in prose:
        assert_citations_hold(summaries[path]["summary"], summaries[path]["citations"], prose)
    assert data["summary"] == "\n".join(f"{p}: {s['summary']}" for p, s in summaries.items())
    assert data["citations"] == [c for s in summaries.values() for c in s["citations"]]
    # And code is summarized by its docstring and public definitions, not private ones
    code = summaries["src/ledger.py"]
    assert code["kind"] == "code" and summaries["docs/beekeeping.md"]["kind"] == "text"
    assert "Ledger of payments." in code["summary"]
    assert "`def record(amount: int)`: Record one payment." in code["summary"]
    assert "`class Ledger`: All payments of an account." in code["summary"]
    assert "_private" not in code["summary"]
    # And each definition cites its own lines (its def line first, its body after)
    ledger_lines = module.splitlines()
    for citation, head in zip(code["citations"], ('"""Ledger', "def record", "class Ledger")):
        first, last = citation["lines"]
        assert ledger_lines[first - 1].startswith(head), (citation, head)
        assert head.split()[-1].strip('"') in "\n".join(ledger_lines[first - 1:last])
    assert code["citations"][1] == {"path": "src/ledger.py", "lines": [6, 7]}
    # And other languages by their leading comment and definition lines
    assert summaries["web/app.js"]["summary"] == (
        "Serves the shop's pages. Over HTTP. [web/app.js:2-3] "
        "`export async function start(port)` [web/app.js:6-6]")
    assert data["corpus"] == {"documents": 4, "source": "task"}


def test_document_analysis_reports_statistics_and_answers_a_query(cluster: Cluster) -> None:
    # Given two carried documents
    documents = [d for d in corpus_documents() if d["path"].endswith(("bees.md", "keeping.md",
                                                                      "reefs.md"))]
    client = researcher(cluster)
    # When they are analysed with a question
    data = ask(client, "document_analysis", {"documents": documents,
                                             "query": "what makes corals turn white"})
    # Then each has its statistics, and the answer cites the right one
    stats = {a["path"]: a for a in data["analysis"]}
    bees = stats["docs/beekeeping.md"]
    text = documents[0]["content"]
    assert bees["words"] == len(re.findall(r"[A-Za-z0-9]+", text)) == 105
    assert [h["text"] for h in bees["headings"]] == ["Keeping honeybees", "Honey", "Swarming"]
    assert bees["headings"][1] == {"level": 2, "text": "Honey", "line": 6}
    assert bees["top_terms"][0] == ["queen", 4]
    assert bees["reading_time_min"] == round(105 / 230, 1)
    assert data["results"][0]["path"] == "docs/coral_reefs.md"
    assert "bleaching" in data["summary"] or "turn white" in data["summary"]


def test_with_an_llm_the_summary_is_written_from_the_passages_and_stays_cited(
        cluster: Cluster) -> None:
    documents = corpus_documents()
    bees = next(d for d in documents if d["path"] == "docs/beekeeping.md")
    honey = next(p for p in split_passages(bees["path"], bees["content"]) if "nectar" in p.text)
    label = f"[docs/beekeeping.md:{honey.first_line}-{honey.last_line}]"
    with FakeLLMServer() as server:
        # Given a researcher with an LLM whose answer cites the passage it used
        server.push(TextReply(f"Bees fan nectar until it thickens into honey. {label}"))
        client = researcher(cluster, ORCH_LLM_BASE_URL=server.url)
        # When it researches a question
        data = ask(client, "search", {"query": "how do bees turn nectar into honey",
                                      "documents": documents})
        # Then the LLM was given the retrieved passages under their citations, and its
        # answer is the summary, with the citations it made
        (request,) = server.wait_chat_requests(1)
        prompt = request.body["messages"][-1]["content"]
        assert label in prompt and honey.text in prompt
        assert data["summary_by"] == "llm"
        assert data["summary"] == f"Bees fan nectar until it thickens into honey. {label}"
        assert data["citations"] == [{"path": "docs/beekeeping.md",
                                      "lines": [honey.first_line, honey.last_line]}]
        assert data["results"][0]["path"] == "docs/beekeeping.md"
        # When the LLM cites nothing, the passages it was given are cited for it
        server.push(TextReply("Honey comes from nectar."))
        uncited = ask(client, "search", {"query": "nectar honey", "documents": documents})
        assert uncited["summary"].startswith("Honey comes from nectar. Sources: [docs/")
        assert uncited["citations"] and all(
            f"[{c['path']}:{c['lines'][0]}-{c['lines'][1]}]" in uncited["summary"]
            for c in uncited["citations"])
        # When the LLM rejects the request, the extractive summary stands, said so
        server.push(ErrorReply(400, {"error": {"message": "context too long"}}))
        rejected = ask(client, "search", {"query": "queen bee eggs", "documents": documents})
        assert rejected["summary_by"] == "extractive" and "context too long" in \
            rejected["llm_error"]
        assert "[docs/beekeeping.md:" in rejected["summary"]


# ------------------------------------------------------------------ the index itself

@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('abc xyz"*()^:-+NEARORANDOT{}[]\'\\,.0123')),
               max_size=40) | st.text(max_size=40))
def test_any_text_is_a_valid_query(text: str) -> None:
    # Given an index of the corpus, any free text searches without an FTS5 syntax error
    index = SearchIndex.memory()
    try:
        index.add_document("doc.md", "abc xyz near or and not 0123 honey")
        hits = index.search(text)
        # and a text naming a (non stop) word of the document finds it
        named = set(words(text)) & {"abc", "xyz", "near", "0123", "honey"}
        if named:
            assert hits and fts_query(text) is not None, text
    finally:
        index.close()


def test_passages_keep_their_line_ranges() -> None:
    # Given a document of short paragraphs and one long block
    content = "# Title\n\nFirst paragraph.\nSecond line.\n\n" + \
        "\n".join(f"line {i}" for i in range(45)) + "\n"
    passages = split_passages("a.md", content)
    # Then the heading joins its paragraph, the long block is cut in windows of 20 lines,
    # and every passage's text is exactly its cited lines
    lines = content.splitlines()
    assert [(p.first_line, p.last_line) for p in passages] == \
        [(1, 4), (6, 25), (26, 45), (46, 50)]
    for p in passages:
        assert p.text == "\n".join(lines[p.first_line - 1:p.last_line])
    assert passages[0].title == "a md Title"


def test_a_fenced_code_block_is_one_passage_so_none_starts_inside_code() -> None:
    # Given prose, then a 30-line code block with blank lines in it, then prose
    code = "\n".join("" if i % 5 == 4 else f"vector_db.query({i})" for i in range(30))
    content = ("Intro about the search.\nSecond line.\nThird line.\n\n```python\n" + code
               + "\n```\nAfter the code: vector databases trade recall for speed.\n")
    passages = split_passages("a.md", content)
    lines = content.splitlines()
    # Then the code block, fences included, is one passage: its blank lines do not cut it
    assert [(p.first_line, p.last_line) for p in passages] == [(1, 3), (5, 36), (37, 37)]
    assert passages[1].text.startswith("```python") and passages[1].text.endswith("```")
    for p in passages:
        assert p.text == "\n".join(lines[p.first_line - 1:p.last_line])
    # And a researcher reading the code passage finds no sentence in it
    assert sentence_units("a.md", 5, passages[1].text) == []


def test_fts5_is_available() -> None:
    # The index relies on SQLite's FTS5 extension, which this Python's sqlite3 must have
    with sqlite3.connect(":memory:") as db:
        db.execute("CREATE VIRTUAL TABLE t USING fts5(body)")
    db.close()


def test_a_cached_index_evicted_during_a_search_stays_open_until_it_ends(
        tmp_path: Path) -> None:
    # Given the researcher's cache of carried document sets
    corpora = Corpora(None, tmp_path)
    sets = [[(f"doc{i}.md", f"topic number {i} honey")] for i in range(TASK_INDEX_CACHE + 1)]
    try:
        with corpora.lease(sets[0]) as (first, cached):
            assert not cached
            # When more sets than the cache holds are searched while the first one is
            for documents in sets[1:]:
                with corpora.lease(documents) as (index, _):
                    assert index.search("honey")
            # Then the first index, evicted meanwhile, still answers its search
            assert [h.passage.path for h in first.search("honey")] == ["doc0.md"]
        # And it is closed once that search ended, and built again when asked for
        with pytest.raises(sqlite3.ProgrammingError):
            first.search("honey")
        with corpora.lease(sets[0]) as (again, cached):
            assert not cached and again is not first
        with corpora.lease(sets[0]) as (same, cached):
            assert cached and same is again
    finally:
        corpora.close()
