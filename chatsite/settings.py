"""Django settings for chatsite.

Nothing here reads the environment or config.toml directly: every value comes
through the typed helpers of :mod:`chatsite.config`, and every setting is listed
in ``docs/configuration.md``. Settings that need more than parsing (the model
table, the default model) are checked by the system checks of ``inference``.
"""

from __future__ import annotations

import os
from pathlib import Path

from chatsite import config
from chatsite.config import BASE_DIR

DEBUG = config.get_bool("server.debug", False)

# No key ships with the code (a known key would sign everybody's sessions):
# without server.secret_key, one is generated at the first start and kept in
# server.secret_key_file, readable by its owner only, so that sessions and the
# hashed session owners of conversations survive restarts.
SECRET_KEY = config.get_str("server.secret_key", "") or config.secret_key_from_file(
    Path(config.get_str("server.secret_key_file", str(BASE_DIR / "var" / "secret_key")))
)

# "development" (the default: plain HTTP on one machine) or "production":
# behind a TLS-terminating reverse proxy that sets X-Forwarded-Proto, with the
# security settings below, so that `manage.py check --deploy` passes with no
# warning. docs/deployment.md lists the headers the proxy must set.
SERVER_PROFILE = config.get_choice("server.profile", "development", ("development", "production"))
PRODUCTION = SERVER_PROFILE == "production"
if PRODUCTION:
    # The proxy terminates TLS and says so; Django then builds https URLs,
    # marks cookies secure and redirects plain HTTP, except for the probes
    # and the scrape that reach each process directly, inside the network.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = config.get_bool("server.ssl_redirect", True)
    SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = config.get_int("server.hsts_seconds", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = config.get_bool("server.hsts_include_subdomains", True)
    SECURE_HSTS_PRELOAD = config.get_bool("server.hsts_preload", True)
    SECURE_REFERRER_POLICY = "same-origin"
    X_FRAME_OPTIONS = "DENY"
    if DEBUG:
        raise config.ConfigError("server.debug must be false with server.profile = production")

ALLOWED_HOSTS = config.get_list("server.allowed_hosts", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = config.get_list("server.csrf_trusted_origins", [])
# The origins (scheme://host[:port]) whose pages may open the site's
# WebSockets. Empty: http and https of every allowed host, and the origin
# each handshake was sent to when its host is allowed (chatsite.origins).
CHATSITE_ORIGINS = config.get_origins("server.origins")

INSTALLED_APPS = [
    # daphne first, so that runserver serves ASGI (and WebSockets) too.
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_prometheus",
    "csp",
    "inference",
    "chat",
    "api",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    # Before anything counts a request by its method (chatsite.middleware).
    "chatsite.middleware.RefuseUnknownMethods",
    "chatsite.middleware.OpenAIErrorsOnV1",
    "chatsite.middleware.TransientDatabaseErrors",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "chatsite.middleware.RenewSessions",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
ASGI_APPLICATION = "chatsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# One URL names the database: SQLite (the embedded default) or PostgreSQL for
# several front ends. django-prometheus's wrappers count queries and errors.
DATABASE_URL = config.get_str("database.url", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
DATABASES = {"default": config.database_from_url(DATABASE_URL)}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # whitenoise's compressed manifest storage, which also hashes the names the
    # chat page's JavaScript modules import (chatsite/storage.py).
    "staticfiles": {"BACKEND": "chatsite.storage.StaticFilesStorage"},
}

# Channels: the in-memory layer serves one process (the embedded default);
# a Redis URL switches to the layer that several Daphne front ends share.
REDIS_URL = config.get_str("channels.redis_url", "")
# Messages the Redis layer keeps for one process before a send to it fails.
# One Redis key holds every process-local channel of a process (its
# WebSockets and, in workers mode, all its reply channels), and the capacity
# counts over that key: channels-redis's default of 100 is two seconds of one
# stream. 1000 absorbs a front end's stall of about a second (it reads about
# 770 messages/s, measured); past it, the worker ends the job as an error
# with its text (inference.workers).
CHANNELS_CAPACITY = config.get_int("channels.capacity", 1000, minimum=10)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default, the same as
            # the 5 s a channels-redis receive blocks in BZPOPMIN: every idle
            # receive then raised TimeoutError. Reads may take longer than the
            # block; a dead Redis is still noticed within 15 s.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}],
                "channel_capacity": {"specific.*": CHANNELS_CAPACITY},
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": CHANNELS_CAPACITY},
        }
    }

# --- Inference -------------------------------------------------------------
# The model table: name -> {path | hf_repo + hf_file | bundled, context_size,
# gpu_layers, ...}. Validated by inference.checks; parsed by inference.registry.
CHATSITE_MODELS = config.get_table("models")
CHATSITE_DEFAULT_MODEL = config.get_str("inference.default_model", "smollm2-135m")
# Where the GGUF models run: "local" (in each serving process) or "workers"
# (in `manage.py inference_worker` processes, reached over the Redis channel
# layer; the front ends then load no model). Remote models (a `url`) are
# reached directly in both modes.
CHATSITE_INFERENCE_MODE = config.get_choice("inference.mode", "local", ("local", "workers"))
# Workers mode: a worker that sends nothing about a job (text or a heartbeat,
# every second) for this many seconds is taken for dead and its reply is
# marked interrupted; a job no worker accepts within the accept timeout is
# refused as busy (503 with Retry-After on the API).
CHATSITE_WORKER_TIMEOUT = config.get_float("inference.worker_timeout", 5.0, minimum=1.0)
CHATSITE_WORKER_ACCEPT_TIMEOUT = config.get_float("inference.worker_accept_timeout", 3.0, minimum=0.5)
# Workers mode: the secret shared by the front ends and the inference workers;
# every job and reply message on the channel layer carries an HMAC made with
# it, and a message without a valid one is dropped (inference.workers).
CHATSITE_WORKER_SECRET = config.get_str("inference.worker_secret", "")
# How many requests may wait for a model while it generates for another.
CHATSITE_QUEUE_SIZE = config.get_int("inference.queue_size", 8, minimum=0)
# Threads llama.cpp uses for decoding; 0 means every usable CPU but one.
CHATSITE_N_THREADS = config.get_int("inference.n_threads", 0, minimum=0)
# Identical greedy output whatever ran before (one sequence at a time, prompt
# chunks at fixed positions), at the cost of batching and of most prompt-cache
# reuse. Off (the default) favours speed, as llama-server and vLLM do.
CHATSITE_DETERMINISTIC = config.get_bool("inference.deterministic", False)
# Sequences each model decodes together, unless its table sets `parallel`;
# 0: the engine's default for the machine (CPU or GPU build).
CHATSITE_PARALLEL = config.get_int("inference.parallel", 0, minimum=0)
# RAM kept for the KV state of conversations whose slot went to another
# request (least recently used evicted), per model, in MiB; 0 disables it.
CHATSITE_PROMPT_CACHE_MIB = config.get_int("inference.prompt_cache_mib", 512, minimum=0)
# Defaults for requests that do not say otherwise.
CHATSITE_DEFAULT_MAX_TOKENS = config.get_int("inference.default_max_tokens", 512, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "{asctime} {levelname} {name}: {message}", "style": "{"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": config.get_str("server.log_level", "INFO")},
    "loggers": {
        "django": {"level": "INFO"},
        # Daphne logs every request at INFO; keep it to warnings.
        "daphne": {"level": "WARNING"},
        # The remote backends' HTTP client logs every request's URL at INFO,
        # credentials included; inference.remote logs failures without them.
        "httpx2": {"level": "WARNING"},
    },
}

# The hub client is used only to fetch configured hub models; it sends no usage
# reports of its own.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# A bearer token that /metrics requires; empty leaves /metrics open.
CHATSITE_METRICS_TOKEN = config.get_str("metrics.token", "")

# --- Conversations -----------------------------------------------------------
# The prompt keeps at most this many of the most recent messages of the shown
# branch (20 in the original service), before trimming to the context window.
CHATSITE_MAX_HISTORY_MESSAGES = config.get_int("chat.max_history_messages", 20, minimum=1)
# A reply is generated for a user or for an anonymous browser session; with
# this on, only signed-in users may chat (the site redirects to the login page
# and the WebSocket refuses anonymous connections).
CHATSITE_REQUIRE_LOGIN = config.get_bool("chat.require_login", False)
# After a conversation's first reply, the model writes it a short title, as a
# low-priority request that gives way to every reply.
CHATSITE_GENERATE_TITLES = config.get_bool("chat.generate_titles", True)
# A reply runs on the server until it ends or is stopped, whether or not a page
# watches it. With this above 0, a site reply that no page has watched for this
# many seconds is stopped (kept as stopped), for machines that want that.
CHATSITE_STOP_UNWATCHED_AFTER = config.get_float("chat.stop_unwatched_after", 0.0, minimum=0.0)
# The longest message the site accepts, in characters (WebSocket frames are
# refused past about four times this many bytes).
CHATSITE_MAX_MESSAGE_CHARS = config.get_int("chat.max_message_chars", 32_000, minimum=1)
# The system prompt of a conversation (the settings panel and the API's
# system messages), in characters.
CHATSITE_MAX_SYSTEM_PROMPT_CHARS = config.get_int("chat.max_system_prompt_chars", 32_000, minimum=1)
# Imports of sessions.json (the command and the API): the file's bytes, its
# messages in all, and the characters of one message's text. The biggest
# import allowed writes in about a second on SQLite (chat.sessions_io.importing).
CHATSITE_IMPORT_MAX_BYTES = config.get_int("chat.import_max_bytes", 4 * 1024 * 1024, minimum=1024)
CHATSITE_IMPORT_MAX_MESSAGES = config.get_int("chat.import_max_messages", 10_000, minimum=1)
CHATSITE_IMPORT_MAX_MESSAGE_CHARS = config.get_int("chat.import_max_message_chars", 131_072, minimum=1)

# --- Accounts ------------------------------------------------------------------
# A session (signed in or an anonymous browser, which owns its conversations
# by it) expires after this many days without use; each day it is used, its
# expiry moves forward (chatsite.middleware.RenewSessions). Expired sessions
# are removed by `manage.py clearsessions`.
SESSION_COOKIE_AGE = config.get_int("chat.session_days", 14, minimum=1) * 24 * 3600
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

# --- Content-Security-Policy (django-csp) ----------------------------------------
# Every script and style is a file of this site: no inline script, no other
# origin (the WebSocket is same-origin too). Images from the site or data:
# URLs only, so that a remote image in a reply is never fetched.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

# --- API ---
# The REST API (api/): keys, body limit, rate limits and the cache that counts
# them. Each setting is in the table of docs/api.md.
# Requests need an API key (Authorization: Bearer csk_...). Off: the API is
# open to anyone who can reach it (a single-user machine), and requests
# without a key act as the user api.open_user, created on first use.
CHATSITE_API_REQUIRE_KEY = config.get_bool("api.require_key", True)
CHATSITE_API_OPEN_USER = config.get_str("api.open_user", "local")
# The largest request body the API reads (a sessions.json import is the
# largest); larger ones are refused with 413.
CHATSITE_API_MAX_BODY_BYTES = config.get_int("api.max_body_bytes", 4 * 1024 * 1024, minimum=1024)
# Django refuses bodies past this before any view sees them: never below the API's limit.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(2_621_440, CHATSITE_API_MAX_BODY_BYTES + 1)
# Budgets per minute (0: no limit). Keys may override theirs in the admin.
CHATSITE_RATELIMIT_KEY_REQUESTS_PER_MINUTE = config.get_int(
    "ratelimit.key_requests_per_minute", 60, minimum=0
)
CHATSITE_RATELIMIT_KEY_TOKENS_PER_MINUTE = config.get_int(
    "ratelimit.key_tokens_per_minute", 20_000, minimum=0
)
CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE = config.get_int(
    "ratelimit.address_requests_per_minute", 120, minimum=0
)
CHATSITE_RATELIMIT_ADDRESS_TOKENS_PER_MINUTE = config.get_int(
    "ratelimit.address_tokens_per_minute", 40_000, minimum=0
)
# The site's WebSocket, per signed-in user or anonymous browser session.
CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE = config.get_int(
    "ratelimit.session_requests_per_minute", 30, minimum=0
)
CHATSITE_RATELIMIT_SESSION_TOKENS_PER_MINUTE = config.get_int(
    "ratelimit.session_tokens_per_minute", 20_000, minimum=0
)
# Every frame but "stop" (switching versions, editing, ...), per user or session.
CHATSITE_RATELIMIT_SESSION_FRAMES_PER_MINUTE = config.get_int(
    "ratelimit.session_frames_per_minute", 120, minimum=0
)
# Sign-in (the site's and the admin's): failed attempts allowed per user name
# and per client address in each window, before further attempts are refused
# without checking the password (0: no limit).
CHATSITE_LOGIN_FAILURES_PER_USER = config.get_int("ratelimit.login_failures_per_user", 5, minimum=0)
CHATSITE_LOGIN_FAILURES_PER_ADDRESS = config.get_int("ratelimit.login_failures_per_address", 20, minimum=0)
CHATSITE_LOGIN_WINDOW_SECONDS = config.get_int("ratelimit.login_window_minutes", 15, minimum=1) * 60
# Behind a reverse proxy: the header that carries the client's address (for
# example X-Forwarded-For; its last entry is used). Empty: the peer address.
CHATSITE_TRUSTED_PROXY_HEADER = config.get_str("server.trusted_proxy_header", "")
# Where rate limits are counted: empty for this process's memory, or a
# redis:// URL that several processes share.
CHATSITE_CACHE_URL = config.get_str("cache.url", "")
if CHATSITE_CACHE_URL:
    if not CHATSITE_CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
        raise config.ConfigError(f"cache.url must be a redis:// URL or empty, got {CHATSITE_CACHE_URL!r}")
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CHATSITE_CACHE_URL}
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "chatsite"}}
