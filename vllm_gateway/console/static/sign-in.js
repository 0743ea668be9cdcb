// Sign-in: the key is posted once to /console/api/session, which answers with an HttpOnly session
// cookie; the input is cleared before the console opens, and the key goes nowhere else (not the URL,
// not storage, not the page).

const form = document.getElementById("sign-in-form");
const input = document.getElementById("key");
const error = document.getElementById("sign-in-error");
const WRONG_KEY = "The gateway did not accept this key: it is not one of its keys, or it was revoked or disabled.";

// A link to a page of the console (/console/#/keys) came here through the redirect with its route:
// go there once signed in.
function route() {
  return window.location.hash.startsWith("#/") ? window.location.hash : "";
}

async function signIn(event) {
  event.preventDefault();
  const button = form.querySelector("button");
  error.textContent = "";
  button.disabled = true;
  try {
    const answer = await fetch("/console/api/session", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: input.value }),
    });
    if (answer.ok) {
      input.value = "";
      window.location.replace(`/console/${route()}`);
      return;
    }
    let message = `Sign-in failed (${answer.status}).`;
    try {
      const refused = (await answer.json()).error;
      // The API's own sentence for a wrong key tells how to send one in a header: not for this form.
      message = refused.code === "invalid_api_key" ? WRONG_KEY : refused.message || message;
    } catch {
      // not JSON: keep the status
    }
    error.textContent = message;
    input.select();
  } catch (failure) {
    error.textContent = `The gateway did not answer: ${failure.message}`;
  } finally {
    button.disabled = false;
  }
}

form.addEventListener("submit", signIn);

// Already signed in (a bookmark of this page): go to the console.
fetch("/console/api/session", { credentials: "same-origin", cache: "no-store" }).then((answer) => {
  if (answer.ok) window.location.replace(`/console/${route()}`);
});
input.focus();
