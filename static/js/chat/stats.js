// The stats line under a reply, in words: the same parts, in the same order
// and the same words, as templates/chat/_branch.html renders on the server.

// Why a reply ended, as the stats line says it; a reply that simply ended
// ("stop") says nothing. A reason not listed here is shown as it is.
export const FINISH_WORDS = {
  stop: "",
  length: "cut at the length limit",
  cancelled: "stopped",
  error: "failed",
  tool_calls: "called a tool",
};

function finishWords(reason) {
  return Object.prototype.hasOwnProperty.call(FINISH_WORDS, reason) ? FINISH_WORDS[reason] : reason;
}

// The parts of the stats line of a finished reply: its "done" frame's stats
// (completion_tokens, tokens_per_second, time_to_first_token, finish_reason;
// any may be missing or null) and the model's name.
export function statParts(stats, model) {
  const parts = [];
  const tokens = stats.completion_tokens;
  if (tokens !== null && tokens !== undefined) parts.push(tokens + (tokens === 1 ? " token" : " tokens"));
  if (typeof stats.tokens_per_second === "number") parts.push(stats.tokens_per_second.toFixed(1) + " tokens/s");
  if (typeof stats.time_to_first_token === "number") {
    parts.push("first token in " + stats.time_to_first_token.toFixed(2) + " s");
  }
  const ending = stats.finish_reason ? finishWords(stats.finish_reason) : "";
  if (ending) parts.push(ending);
  if (model) parts.push(model);
  return parts;
}
