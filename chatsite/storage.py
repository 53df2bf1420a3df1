"""The static files storage: whitenoise's compressed manifest storage, which
also gives the chat page's JavaScript modules their hashed names.

The chat page's script (static/js/chat.js) is an ES module that reads the
modules of static/js/chat/ through relative imports
(``import { connect } from "./chat/socket.js";``). Django rewrites each such
import to the imported file's hashed name, as it rewrites ``url()`` in CSS, so
that every module is served under a name that changes with its content (and
that whitenoise lets browsers cache for good): a page never runs a new module
with an old one. The rewrite sees ``import {...} from "./..."``,
``export ... from "./..."`` and ``import "./..."`` statements ending with a
semicolon, and ``import("...")``, in every collected ``.js`` file.
"""

from __future__ import annotations

# whitenoise ships no type information.
from whitenoise.storage import CompressedManifestStaticFilesStorage  # type: ignore[import-untyped]


class StaticFilesStorage(CompressedManifestStaticFilesStorage):  # type: ignore[misc]
    support_js_module_import_aggregation = True
    # A file's hashed name depends on the hashed names of the files it imports,
    # so Django repeats its pass over the files until no name changes. A pass
    # visits a folder's files in the order the file system lists them; in the
    # worst order (importers first) a chain of N imports needs N passes after
    # the first (measured). The chat page's longest chain is 5, Django's
    # default number of passes (frames.js > composer.js > branch.js > copy.js >
    # notices.js > page.js, in static/js/chat/): 12 leaves room for more. The
    # imports must form no cycle, which never settles: collectstatic then
    # fails with "Max post-process passes exceeded".
    max_post_process_passes = 12
