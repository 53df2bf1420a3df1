"""Inference workers: GGUF models served by ``manage.py inference_worker``
processes, reached over the (Redis) channel layer.

With ``inference.mode = "workers"``, a front end (Daphne) loads no model:
:func:`inference.registry.get_engine` gives it a
:class:`~inference.workers.client.WorkerClient`, which honours the
:class:`~inference.client.EngineClient` contract by sending each request to
a worker. A worker (:func:`inference.workers.server.serve_forever`, one per
GPU or machine) is given ordinary in-process engines
(:func:`inference.registry.get_local_engine`) for the models it serves.

The package holds one module per side: :mod:`.protocol` (channel names, the
encoding of requests and events, signatures), :mod:`.client` (the front
end's), :mod:`.server` (the worker's) and :mod:`.directory` (the workers'
advertisements in Redis).

How a job travels:

1. :class:`~.client.WorkerStream` (on the front end's event loop) creates a reply
   channel of its own and sends ``job`` (the request, a job id, its reply
   channel and an ``accept_by`` wall-clock deadline) to the model's shared
   channel ``inference.jobs.<model>``.
2. Every worker serving the model blocks on that channel while its engine
   has room (not ``saturated``); Redis hands each message to exactly one of
   them. The worker starts the request on its engine and answers
   ``job.accepted`` with its control channel, or ``job.error`` (busy, context
   too long, ...) when the engine refuses it.
3. The worker sends ``job.delta`` per piece of text and ends with
   ``job.finished`` (the :class:`~inference.types.Finished` event) or
   ``job.error``; every :data:`~.protocol.HEARTBEAT_INTERVAL` it also sends
   ``job.alive`` for each of its jobs, queued or generating. Each of these
   messages names the job, the worker (its control channel) and a sequence
   number, ``seq``.
4. Cancelling the stream sends ``job.cancel`` to the worker's control channel;
   the worker cancels the generation, which ends with ``Finished(cancelled)``.
5. Token counts (:meth:`~.client.WorkerClient.count_prompt_tokens`) are a question
   ``count`` (an id, messages, a reply channel, an ``answer_by`` deadline) on
   ``inference.count.<model>``, answered by one worker with ``count`` or
   ``count.error``.

Deadlines, and what happens on death:

* No worker accepts within ``inference.worker_accept_timeout`` (none alive,
  all saturated): :class:`~inference.types.EngineBusy` (the API answers 503
  with ``Retry-After``). The job stays in Redis, but a worker drops a job
  whose ``accept_by`` has passed, so it is never run late.
* After acceptance, no signed message from the worker for
  ``inference.worker_timeout`` seconds (it died, or lost Redis): the stream
  raises :class:`~inference.types.WorkerLost`, also after text was generated (an extension of
  the contract for this client only); :class:`chat.replies.ReplyRun` stores
  the reply as ``interrupted``. The job is never sent again.
* Double runs: a message goes to one receiver, but channels-redis may put a
  message back when a receiver died between taking it and acknowledging it.
  The front end takes the first ``job.accepted`` only and answers any other
  with ``job.cancel``; a worker also ignores a job id it has seen.

Authentication: every message, in both directions (jobs and their
replies, cancels, heartbeats, token-count questions and answers), carries
``sig``, an HMAC-SHA256 keyed with ``inference.worker_secret`` over a
canonical encoding of all its fields and of the channel it is sent to
(:func:`~.protocol.sign`, :func:`~.protocol.check_signed`). A message without a valid one is
dropped and logged (:class:`~.protocol.DropLog`: the first at once, then a count at
most every :data:`~.protocol.DropLog.interval` seconds). Without the secret, a Redis
client can neither start a job (and so use the GPUs), nor write into a
reply, nor cancel a job; it can still read the messages, and delete or delay
them, which ends the replies concerned as ``error`` or ``interrupted``.
What binds a message to its place:

* ``job`` (the job or count-question id) and the channel: a captured message
  does not verify in another job's reply channel, another model's jobs
  channel or another worker's control channel;
* ``seq``, on every message from the worker to the front end: 0 for
  ``job.accepted`` (or the refusal), then one more per message, heartbeats
  included. The front end takes each number once, so a replayed message (or a
  copy channels-redis redelivers) is dropped;
* the job itself is bound by its ``accept_by`` deadline and is claimed once in
  Redis; a cancel only stops the job it names, which replaying cannot worsen.

Signing is not encryption, and Redis keys other than the channels (the
directory, the job claims) are not signed: keep Redis on a private network,
with a password (``requirepass``, in the URLs).

Delivery: a message is never silently lost.

* On the worker, a send that fails (``ChannelFull``: the front end does not
  read its reply channel in time; Redis gone) cancels the job at once
  (freeing its slot), then :meth:`~.server.Worker._report_failure` tries, for up to
  ``inference.worker_timeout`` seconds, to send ``job.error`` saying so.
* On the front end, a gap in the sequence numbers (a message that was lost:
  a failed send, channels-redis dropping the oldest message of a full local
  buffer, or expiring one after ``expiry`` seconds) ends the stream with
  ``Finished(reason="error")`` and a message saying how many were lost (and
  cancels the job if the worker did not end it), so
  :class:`chat.replies.ReplyRun` stores the reply as ``error`` with the text
  it had. A ``job.error`` after some text ends it the same way; before any,
  it is raised from the iteration (the contract's errors before the first
  token).

Worker processes advertise themselves (their models, running and waiting
requests) in Redis keys that expire after :data:`~.directory.DIRECTORY_TTL` seconds;
:func:`~.directory.live_workers` reads them for ``/ready`` and ``/health``, and
:class:`~.directory.WorkersCollector` for the front ends' ``/metrics``.
"""

from __future__ import annotations
