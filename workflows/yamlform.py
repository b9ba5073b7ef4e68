"""Workflows as YAML files: loaded with errors that name the line and the field.

The YAML form is the dict form of :mod:`workflows.model` written as YAML::

    workflow: audit
    deadline_s: 600
    steps:
      - kind: map_reduce
        name: scan
        mapper: {capability: security_audit}
        reducer: {capability: synthesis}
        min_success: 0.95

The text is composed into YAML's node tree first (each node knows its line and column),
then constructed into plain data and validated by :meth:`Workflow.from_dict`. A
:class:`DefinitionError` names the offending field by its path (``("steps", 0, "mapper",
"capability")``); the path is followed down the node tree to the line where that field is
written. Every failure, a YAML syntax error included, is one :class:`WorkflowFileError`
whose message is one line: ``audit.yaml:7: steps[0].mapper.capability: must be a non-empty
string``.

Hostile input is bounded before it is built: anchors and aliases may share a node but not
nest it in itself, the expanded tree is limited in size and depth, and a key written twice
in one map is an error rather than silently the last one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from workflows.model import DefinitionError, FieldPath, Pipeline, Workflow, format_path, \
    node_to_dict

#: A workflow file bigger than this is refused unread: definitions are a few KiB.
MAX_FILE_BYTES: Final = 1024 * 1024
#: Nodes in the tree with every alias expanded: aliases can multiply a small text into a
#: huge tree ("billion laughs"), which validation would then walk in full.
MAX_EXPANDED_NODES: Final = 100_000
#: Collections nested in each other at most: a definition is a few levels deep, and the
#: validator recurses once per level.
MAX_DEPTH: Final = 64
#: An integer written with more characters than this is refused: the validator compares
#: numbers as floats, and a float cannot hold one of a few hundred digits.
MAX_INT_CHARS: Final = 64
#: What a path's place reads as when the error is about the whole document.
TOP_LEVEL: Final = "top level"

_INT_TAG: Final = "tag:yaml.org,2002:int"
_STR_TAG: Final = "tag:yaml.org,2002:str"
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_STRING_SOURCE: Final = "<string>"


class WorkflowFileError(ValueError):
    """Raised when a workflow file cannot be read, parsed or validated.

    Its message is one line, ``FILE:LINE: FIELD: REASON`` (the line and the field are left
    out where there is none).

    Attributes:
        file: the file name (``<string>`` for text).
        line: the 1-based line of the offending field, or None.
        column: its 1-based column, or None.
        path: the field's path in the dict form (empty for the whole document or no field).
        field: the path written as ``steps[2].mapper.capability`` (``top level`` for the
            whole document, empty where no field is at fault, as in a syntax error).
        reason: what is wrong.
    """

    def __init__(self, file: str, line: int | None, reason: str, *,
                 path: FieldPath | None = None, column: int | None = None) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.path = tuple(path or ())
        # path=() is a definition error about the whole document; None is no field at all.
        self.field = format_path(self.path) or (TOP_LEVEL if path is not None else "")
        self.reason = " ".join(reason.split())
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {self.field}: {self.reason}" if self.field
                         else f"{where}: {self.reason}")


def load_workflow(source: str | os.PathLike[str]) -> Workflow:
    """Load a workflow from a YAML file or from YAML text.

    A path object is a file. A string is a file when it is one line naming an existing
    file or ending in ``.yaml``/``.yml``; otherwise it is the YAML text itself.

    Raises:
        WorkflowFileError: the file cannot be read, the YAML is malformed, or the
            definition is invalid; the message names the line and the field.
    """
    if not isinstance(source, str):
        return load_workflow_file(source)
    one_line = "\n" not in source and "\r" not in source
    if one_line and (source.strip().endswith((".yaml", ".yml")) or _is_file(source)):
        return load_workflow_file(source.strip())
    return load_workflow_text(source)


def load_workflow_file(path: str | os.PathLike[str]) -> Workflow:
    """Load a workflow from a YAML file.

    Raises:
        WorkflowFileError: as :func:`load_workflow`.
    """
    name = os.fspath(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise WorkflowFileError(name, None, f"{size} bytes; a workflow file holds at "
                                    f"most {MAX_FILE_BYTES}")
        raw = Path(path).read_bytes()
    except OSError as error:
        raise WorkflowFileError(name, None, f"cannot read: {error.strerror or error}") \
            from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise WorkflowFileError(name, line, "not UTF-8 text") from error
    return load_workflow_text(text, filename=name)


def load_workflow_text(text: str, *, filename: str = _STRING_SOURCE) -> Workflow:
    """Load a workflow from YAML text.

    Args:
        text: the YAML document.
        filename: the name errors give for the text.

    Raises:
        WorkflowFileError: as :func:`load_workflow`.
    """
    root, data = _parse(text, filename)
    try:
        return Workflow.from_dict(data)
    except DefinitionError as error:
        line, column = _locate(root, error.path)
        raise WorkflowFileError(filename, line, error.reason, path=error.path,
                                column=column) from error
    except (TypeError, ValueError, OverflowError, RecursionError) as error:
        # The checks in _parse keep the validator within its assumptions; this is the net
        # under them, so a definition never ends in a traceback.
        raise WorkflowFileError(filename, root.start_mark.line + 1,
                                f"invalid definition: {error}") from error


def dump_workflow(workflow: Workflow) -> str:
    """The workflow as YAML text that :func:`load_workflow` reads back to an equal one.

    A root pipeline named as the workflow is written as ``steps:``, the form people write.

    Raises:
        ValueError: a step's ``params`` hold a value YAML cannot represent.
    """
    data = workflow.to_dict()
    if isinstance(workflow.root, Pipeline) and workflow.root.name == workflow.name:
        data.pop("root")
        data["steps"] = [node_to_dict(step) for step in workflow.root.steps]
    try:
        text: str = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                              default_flow_style=False, width=100)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"cannot write workflow {workflow.name!r} as YAML: {reason}") \
            from error
    return text


#: Characters YAML reads as line breaks that PyYAML's plain and single-quoted styles do
#: not write back faithfully (a trailing NEL comes back as a space): such strings are
#: written double-quoted, where they are escaped.
_BREAKS: Final = frozenset("\x85\u2028\u2029")


class _Dumper(yaml.SafeDumper):
    """The safe dumper, with strings holding odd line breaks double-quoted."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if _BREAKS & set(value) else None
    return dumper.represent_scalar(_STR_TAG, value, style=style)


_Dumper.add_representer(str, _represent_str)


def _is_file(source: str) -> bool:
    try:
        return len(source) < 4096 and Path(source.strip()).is_file()
    except (OSError, ValueError):
        return False


def _parse(text: str, filename: str) -> tuple[Node, Any]:
    """The document's node tree and its plain data."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as error:
        raise _reader_error(error, text, filename) from error
    try:
        root = loader.get_single_node()
        if root is None:
            raise WorkflowFileError(filename, 1, "the file holds no workflow (it is empty)")
        _check_tree(root, filename, loader)
        return root, loader.construct_document(root)
    except WorkflowFileError:
        raise
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        reason = ": ".join(str(part) for part in (error.context, error.problem) if part)
        raise WorkflowFileError(filename, mark.line + 1 if mark else None,
                                f"YAML syntax: {reason or 'malformed'}",
                                column=mark.column + 1 if mark else None) from error
    except yaml.YAMLError as error:
        raise _reader_error(error, text, filename) from error
    except RecursionError as error:
        raise WorkflowFileError(filename, None, "nested too deeply") from error
    except (ValueError, TypeError, OverflowError) as error:
        # _check_tree builds every typed scalar first, so this is only a net under it.
        raise WorkflowFileError(filename, None, f"cannot read a value: {error}") from error
    finally:
        loader.dispose()


def _reader_error(error: yaml.YAMLError, text: str, filename: str) -> WorkflowFileError:
    # A ReaderError (a character YAML does not allow) knows its offset, not its line.
    position = getattr(error, "position", None)
    line = text[:position].count("\n") + 1 if isinstance(position, int) else None
    reason = getattr(error, "reason", None) or "malformed"
    return WorkflowFileError(filename, line, f"YAML syntax: {reason}")


def _check_tree(root: Node, filename: str, loader: yaml.SafeLoader) -> None:
    """Refuse what would make validation loop, explode or overflow; see the module doc.

    Typed scalars (numbers, dates, explicit tags) are built here one by one, so that a
    value YAML's constructor cannot build (``!!int abc``, ``2001-02-30``) names its line.
    """
    expanded: dict[int, int] = {}
    on_path: set[int] = set()

    def fail(node: Node, reason: str) -> WorkflowFileError:
        return WorkflowFileError(filename, node.start_mark.line + 1, reason,
                                 column=node.start_mark.column + 1)

    def visit(node: Node, depth: int) -> int:
        if id(node) in expanded:
            return expanded[id(node)]
        if id(node) in on_path:
            raise fail(node, "an alias refers to a node that contains it")
        if depth > MAX_DEPTH:
            raise fail(node, f"nested more than {MAX_DEPTH} levels deep")
        size = 1
        if isinstance(node, ScalarNode):
            if node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
                raise fail(node, f"a number of more than {MAX_INT_CHARS} digits")
            if node.tag not in (_STR_TAG, _MERGE_TAG):
                try:
                    loader.construct_object(node)
                except (ValueError, TypeError, OverflowError) as error:
                    raise fail(node, f"cannot read {node.value!r} as {node.tag}: {error}") \
                        from error
        else:
            on_path.add(id(node))
            if isinstance(node, MappingNode):
                _check_keys(node, fail)
                children = [child for pair in node.value for child in pair]
            else:
                children = list(node.value)
            for child in children:
                size += visit(child, depth + 1)
                if size > MAX_EXPANDED_NODES:
                    raise fail(node, f"expands to more than {MAX_EXPANDED_NODES} nodes "
                               "(aliases)")
            on_path.discard(id(node))
        expanded[id(node)] = size
        return size

    visit(root, 0)


def _check_keys(node: MappingNode, fail: Any) -> None:
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, ScalarNode):
            if (key.tag, key.value) in seen and key.tag != _MERGE_TAG:
                raise fail(key, f"the key {key.value!r} is written twice in this map")
            seen.add((key.tag, key.value))


def _locate(root: Node, path: FieldPath) -> tuple[int, int]:
    """The 1-based line and column where the field at ``path`` is written.

    A map's field is found at its key (an unknown or invalid field points at its own key),
    a list's item at the item. Where the path leaves the tree (a required field that is
    missing), the deepest existing field on it is named.
    """
    node, mark = root, root.start_mark
    for part in path:
        if isinstance(node, MappingNode) and isinstance(part, str):
            pair = _find_key(node, part)
            if pair is None:
                break
            mark, node = pair[0].start_mark, pair[1]
        elif isinstance(node, SequenceNode) and isinstance(part, int) and \
                0 <= part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def _find_key(node: MappingNode, key: str) -> tuple[Node, Node] | None:
    # The last pair wins, as in the constructed map (merged "<<" pairs come first).
    for key_node, value_node in reversed(node.value):
        if isinstance(key_node, ScalarNode) and _key_text(key_node) == key:
            return key_node, value_node
    return None


def _key_text(node: ScalarNode) -> str:
    """The key as the validator names it: ``str()`` of the constructed key, so ``true``
    reads ``True`` and ``1`` reads ``1``."""
    if node.tag == _STR_TAG:
        return str(node.value)
    try:
        return str(yaml.SafeLoader("").construct_object(node))
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return str(node.value)
